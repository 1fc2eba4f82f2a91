"""The ``[report]`` section of a run file: the end-of-run report written by ``distill``."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustbench_kd.errors import UserError


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
        if self.n_examples < 2:
            raise UserError(f"report.n_examples must be >= 2, got {self.n_examples}")
        if self.n_cam < 0:
            raise UserError(f"report.n_cam must be >= 0, got {self.n_cam}")
        if self.pgd_steps < 1:
            raise UserError(f"report.pgd_steps must be >= 1, got {self.pgd_steps}")
        if not self.eps_factors or any(not f >= 0 for f in self.eps_factors):
            raise UserError(f"report.eps_factors must be a non-empty list of numbers >= 0, got {self.eps_factors}")
        if self.embedding not in ("pca", "tsne"):
            raise UserError(f"report.embedding must be 'pca' or 'tsne', got {self.embedding!r}")
        if not self.tsne_perplexity > 1:
            raise UserError(f"report.tsne_perplexity must be > 1, got {self.tsne_perplexity}")
