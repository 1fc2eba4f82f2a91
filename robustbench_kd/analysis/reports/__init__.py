"""End-of-run analyses and reports.

* :mod:`.analyses`: logit-correlation difference, PCA embedding, accuracy against eps, CAMs;
* :mod:`.figures`: one PNG per figure (matplotlib, Agg);
* :mod:`.run_report`: a run's ``report/report.md`` (end of ``distill``, ``robustbench-kd report RUN_DIR``);
* :mod:`.compare`: ``comparison.md`` + ``tradeoff.png`` across run directories.

Importing this package imports only the ``[report]`` section (config.py reads it): no torch models,
matplotlib or trainer.
"""

from __future__ import annotations

from robustbench_kd.analysis.reports.section import ReportSection

__all__ = ["ReportSection"]
