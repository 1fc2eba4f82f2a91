"""Optional TensorBoard logging of the diagnostic scalars (``diagnostics.tensorboard = true``).

``tensorboard`` is optional (extra ``[tensorboard]``): :func:`check_available` turns its absence into a
one-line UserError at the start of training, before any epoch is spent.
"""

from __future__ import annotations

from pathlib import Path

from robustbench_kd.errors import UserError

LOG_DIR = Path("diagnostics") / "tensorboard"


def check_available() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError(
            "diagnostics.tensorboard = true needs the tensorboard package: pip install tensorboard "
            "(or set diagnostics.tensorboard = false; the numbers are in metrics.jsonl anyway)"
        ) from None


def write_scalars(out_dir: Path, epoch: int, scalars: dict[str, float]) -> None:
    """Add ``scalars`` at global step ``epoch`` (1-based) under OUT/diagnostics/tensorboard."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir / LOG_DIR))
    try:
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=epoch)
    finally:
        writer.close()
