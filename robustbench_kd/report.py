"""Final evaluation of a model and everything written for it.

For a model (a trained student, a teacher, or any checkpoint) this runs the configured attacks on the
test set and writes, under the output directory:

* ``model_info/<dataset>/<threat_model>/<name>.json`` - the RobustBench leaderboard entry (exact key
  set and types of RobustBench's ``model_info`` files);
* ``models/<dataset>/<threat_model>/<name>.pt`` - the weights in the model-zoo layout that
  ``robustbench.utils.load_model`` reads;
* ``results/<name>.json`` - every number measured (FGSM/PGD/CW too, with PGD's step size), the
  AutoAttack version, seed and flags.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelInfoSection
from .io import atomic_write_text
from .threat import format_eps

log = logging.getLogger(__name__)


@dataclass
class ModelReport:
    """What was measured and written for one model."""

    label: str
    accuracy: dict[str, float]
    pgd_alpha: float | None
    pgd_steps: int | None
    n_examples: int
    flags: list[str]
    model_info_path: Path | None = None
    checkpoint_path: Path | None = None
    results_path: Path | None = None


def evaluate_and_write(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, label: str, model_id: str | None,
                       dataset: str, norm: str, eps: float, attacks: list[str], out_dir: Path,
                       meta: ModelInfoSection | None = None, architecture: str | None = None,
                       batch_size: int = 256, seed: int = 0, pgd_steps: int = 20,
                       device: torch.device | None = None, progress: bool = True, host: Any = None,
                       run: Any = None, save_model: bool = True) -> ModelReport:
    """Evaluate ``model`` on ``(x, y)``; when ``model_id`` is given write the three outputs above."""
    from .evaluation import evaluate_model

    result = evaluate_model(model, x, y, norm=norm, eps=eps, attacks=attacks, batch_size=batch_size, seed=seed,
                            pgd_steps=pgd_steps, device=device, progress=progress)
    report = ModelReport(label=label, accuracy=dict(result.accuracy), pgd_alpha=result.pgd_alpha,
                         pgd_steps=result.pgd_steps, n_examples=result.n_examples,
                         flags=list(result.autoattack_flags))
    if model_id is None:
        return report
    out_dir = Path(out_dir)
    results = {"model": model_id, "dataset": dataset, "threat_model": norm, "eps": format_eps(eps),
               **result.to_dict()}
    report.results_path = out_dir / "results" / f"{model_id}.json"
    atomic_write_text(report.results_path, json.dumps(results, indent=2) + "\n")
    if "autoattack" in result.accuracy:
        report.model_info_path = _write_model_info(result, model_id=model_id, dataset=dataset, norm=norm, eps=eps,
                                                   out_dir=out_dir, meta=meta or ModelInfoSection(),
                                                   architecture=architecture, host=host, run=run)
    else:
        log.warning("no standard AutoAttack in eval.attacks: model_info JSON for %s not written "
                    "(leaderboard entries need 'autoattack')", model_id)
    if save_model:
        from .evaluation.export import save_zoo_checkpoint

        report.checkpoint_path = save_zoo_checkpoint(model, out_dir, dataset=dataset, threat_model=norm,
                                                     model_id=model_id)
    return report


def _write_model_info(result: Any, *, model_id: str, dataset: str, norm: str, eps: float, out_dir: Path,
                      meta: ModelInfoSection, architecture: str | None, host: Any, run: Any) -> Path:
    from .evaluation.model_info import build_model_info, write_model_info

    flags = list(result.autoattack_flags)
    footnote = meta.footnote
    if flags:
        # AutoAttack's own checks fired (zero gradients, randomness, probability outputs, Square beating
        # the gradient attacks): the number may be an overestimate, so say so in the entry itself.
        note = "AutoAttack flagged: " + "; ".join(flags)
        footnote = f"{footnote} {note}" if footnote else note
        log.warning("AutoAttack flagged %s as possibly unreliable: %s", model_id, "; ".join(flags))
    info = build_model_info(
        dataset=dataset, threat_model=norm, eps=eps, clean_acc=result.accuracy["clean"],
        autoattack_acc=result.accuracy["autoattack"], name=meta.title, authors=meta.authors, venue=meta.venue,
        link=meta.link, architecture=meta.architecture or architecture, additional_data=meta.additional_data,
        number_forward_passes=1, reported=meta.reported, footnote=footnote, unreliable=bool(flags),
    )
    if host is not None:
        host.model_info(info, run)
    return write_model_info(out_dir, info, dataset=dataset, threat_model=norm, model_id=model_id)


def format_table(reports: list[ModelReport]) -> str:
    """A plain-text table: model | clean | FGSM | PGD-k (step) | CW | AutoAttack, in percent."""
    columns: list[tuple[str, str]] = []
    for rep in reports:
        for key in rep.accuracy:
            if key not in [c[0] for c in columns]:
                columns.append((key, _header(key, rep)))
    header = ["model", *[h for _, h in columns]]
    rows = [[rep.label, *[f"{100 * rep.accuracy[k]:.2f}" if k in rep.accuracy else "-" for k, _ in columns]]
            for rep in reports]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _header(key: str, rep: ModelReport) -> str:
    if key.startswith("pgd") and rep.pgd_alpha is not None:
        return f"{key.upper()} (step {format_eps(rep.pgd_alpha)})"
    return {"clean": "clean", "autoattack": "AutoAttack", "autoattack-quick": "AA-quick"}.get(key, key.upper())
