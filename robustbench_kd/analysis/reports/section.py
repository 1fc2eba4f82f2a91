"""The ``[report]`` section of a run file: the end-of-run report written by ``distill``."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustbench_kd.errors import UserError
from robustbench_kd.threat import check_int, check_real


@dataclass(frozen=True)
class ReportSection:
    """``[report]``: analyses and figures written to ``<out_dir>/report/`` at the end of ``distill``.

    The analyses read the first ``n_examples`` test examples, after the final evaluation has read the
    test set (nothing here selects a checkpoint).
    """

    enabled: bool = True  #: write the report at the end of distill (also `robustbench-kd report RUN_DIR`)
    n_examples: int = 128  #: test examples the analyses use (correlations, embedding, eps sweep)
    n_cam: int = 4  #: examples whose CAMs are drawn (clean and adversarial)
    eps_factors: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 1.5, 2.0])  #: sweep, x threat.eps
    pgd_steps: int = 10  #: PGD steps of the adversarial examples and the eps sweep
    embedding: str = "pca"  #: 2-D embedding of student features: "pca" or "tsne"
    tsne_perplexity: float = 30.0  #: t-SNE perplexity (clipped to (N - 1) / 3 for N points)

    def __post_init__(self) -> None:
        check_int(self.n_examples, what="report.n_examples", low=2)
        check_int(self.n_cam, what="report.n_cam")
        check_int(self.pgd_steps, what="report.pgd_steps", low=1)
        factors = self.eps_factors
        if not isinstance(factors, (list, tuple)) or not factors or len(factors) > _MAX_FACTORS:
            raise UserError(
                f"report.eps_factors must be a list of 1 to {_MAX_FACTORS} numbers >= 0, got {_short(factors)}"
            )
        for i, f in enumerate(factors):
            check_real(f, what=f"report.eps_factors[{i}]", low=0)
        if self.embedding not in ("pca", "tsne"):
            raise UserError(f"report.embedding must be 'pca' or 'tsne', got {self.embedding!r}")
        check_real(self.tsne_perplexity, what="report.tsne_perplexity", low=1, low_open=True, rule="> 1")


#: The eps sweep attacks the report's examples once per factor: a few dozen is already a long report.
_MAX_FACTORS = 100


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."
