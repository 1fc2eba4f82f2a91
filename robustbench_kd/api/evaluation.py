"""``evaluate()``: the leaderboard evaluation of any model, with ``robustbench.eval.benchmark``'s keywords."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.final_report import ModelReport
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.threat import parse_number, validate_eps

__all__ = ["EvalResult", "default_eps", "evaluate"]

#: What ``robustbench-kd evaluate`` runs by default: clean, a PGD sanity number, and standard AutoAttack.
DEFAULT_ATTACKS = ("clean", "pgd", "autoattack")


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured (accuracies are fractions in [0, 1], as ``benchmark()`` returns them).

    Attributes:
        clean_accuracy: accuracy on the clean test points.
        robust_accuracy: accuracy under standard AutoAttack (``autoattack``, else ``autoattack-quick``), else
            the lowest accuracy under the attacks that ran; None when only ``clean`` ran.
        accuracy: every attack's accuracy, by attack name.
        dataset, threat_model, eps, n_examples: what was evaluated.
        paths: the files written with ``name=`` (``results``, ``points``, ``model_info``,
            ``zoo_checkpoint``, ``safetensors``, ``bundle``); empty without a name.
        report: the full record (sanity verdict, AutoAttack flags, bundle status).
    """

    clean_accuracy: float | None
    robust_accuracy: float | None
    accuracy: dict[str, float]
    dataset: str
    threat_model: str
    eps: float
    n_examples: int
    paths: dict[str, Path] = field(default_factory=dict)
    report: ModelReport | None = field(default=None, repr=False)


def default_eps(dataset: str, threat_model: str) -> float:
    """The leaderboard radius: 8/255 Linf and 0.5 L2 (4/255 Linf on ImageNet); 0.2 on the 8x8 digits."""
    if dataset == "digits":
        return 0.2
    if threat_model == "Linf":
        return 4 / 255 if dataset == "imagenet" else 8 / 255
    return 0.5


def evaluate(
    model: nn.Module | str | os.PathLike[str],
    *,
    dataset: Any = "cifar10",
    threat_model: Any = "Linf",
    eps: float | str | None = None,
    n_examples: int | None = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    data_dir: str | os.PathLike[str] = "./data",
    device: Any = None,
    batch_size: int = 256,
    seed: int = 0,
    name: str | None = None,
    out_dir: str | os.PathLike[str] = ".",
    preprocessing: str | None = None,
    aa_state_path: str | os.PathLike[str] | None = None,
    pgd_steps: int = 20,
    sanity: bool = True,
    teacher: str | None = None,
    model_dir: str | os.PathLike[str] = "./models",
    allow_download: bool = False,
    download: bool = False,
    verify_md5: bool = True,
    progress: bool = True,
    model_info: ModelInfoSection | Mapping[str, Any] | None = None,
    shard: str | tuple[int, int] | None = None,
    command: str | None = None,
) -> EvalResult:
    """Evaluate a model as the RobustBench leaderboard does: ``robustbench-kd evaluate`` as a function.

    With the same model, data, seed and batch size, the clean and AutoAttack accuracies equal those of
    ``robustbench.eval.benchmark(model, n_examples=..., dataset=..., threat_model=..., eps=...)``: the
    first ``n_examples`` test points, unshuffled, and original AutoAttack (standard version).

    Args:
        model: an ``nn.Module`` (evaluated as given: put in eval mode and moved to ``device``), a teacher
            spec (``file:PATH[?arch=NAME]``, ``robustbench:cifar10/Linf/Carmon2019Unlabeled``), a
            checkpoint path, or a run directory (its student, as the run's final evaluation reports it).
        dataset, threat_model: names (``"cifar10"``, ``"Linf"``) or robustbench's ``BenchmarkDataset`` /
            ``ThreatModel`` members.
        eps: the radius (``8/255`` or ``"8/255"``); default :func:`default_eps`.
        n_examples: the first N test points; default all (the leaderboard protocol).
        attacks: from ``clean``, ``fgsm``, ``pgd``, ``cw``, ``autoattack``, ``autoattack-quick``.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"`` or a ``torch.device``.
        name: a model id: writes ``results/``, ``model_info/``, ``models/`` and the submission bundle under
            ``out_dir``, as the command's ``--name`` does; without it nothing is written.
        aa_state_path: AutoAttack state file; an interrupted evaluation resumes from it.
        sanity: run the evaluation sanity suite (gradient masking, eps units); ``teacher`` adds its transfer
            attack check.
        model_info: the leaderboard entry's paper metadata (title, authors, venue, link, ...).
        shard: ``"I/N"``: evaluate only shard I of N and write its shard file (needs ``name``).
        command: the command line to record in the submission bundle (the CLI passes its own).

    Raises:
        UserError: the one-line mistakes the command reports (unknown dataset, eps in the wrong unit, ...).
    """
    from robustbench_kd.evaluation.shards import parse_shard
    from robustbench_kd.jobs.pipeline import evaluate_spec

    dataset_name, norm = _enum_value(dataset, "dataset"), _enum_value(threat_model, "threat_model")
    radius = default_eps(dataset_name, norm) if eps is None else parse_number(eps, what="eps")
    validate_eps(radius, norm, what="eps")
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise UserError(
            f"model must be an nn.Module, a spec (file:..., robustbench:...), a checkpoint path or a run "
            f"directory, got {type(model).__name__}"
        )
    meta = model_info if isinstance(model_info, ModelInfoSection) or model_info is None else _meta(model_info)
    report = evaluate_spec(
        model if isinstance(model, nn.Module) else os.fspath(model),
        dataset=dataset_name,
        data_dir=os.fspath(data_dir),
        norm=norm,
        eps=radius,
        attacks=list(attacks),
        n_examples=n_examples,
        batch_size=batch_size,
        seed=seed,
        pgd_steps=pgd_steps,
        out_dir=out_dir,  # type: ignore[arg-type]  # checked (and made a Path) by evaluate_spec
        model_id=name,
        model_dir=os.fspath(model_dir),
        allow_download=allow_download,
        download=download,
        verify_md5=verify_md5,
        device="auto" if device is None else str(device),
        meta=meta,
        progress=progress,
        sanity=sanity,
        teacher=teacher,
        command=command,
        shard=parse_shard(shard) if isinstance(shard, str) else shard,
        aa_state=None if aa_state_path is None else Path(aa_state_path),
        preprocessing=preprocessing,
    )
    return _result(report, dataset=dataset_name, threat_model=norm, eps=radius)


def _enum_value(value: Any, what: str) -> str:
    """``"cifar10"`` from ``"cifar10"`` or from robustbench's ``BenchmarkDataset.cifar_10``."""
    value = getattr(value, "value", value)
    if not isinstance(value, str):
        raise UserError(f"{what} must be a name such as 'cifar10' / 'Linf', got {value!r}")
    return value


def _meta(values: Mapping[str, Any]) -> ModelInfoSection:
    from robustbench_kd.config import section_from_mapping

    return section_from_mapping(ModelInfoSection, values, "model_info")  # type: ignore[no-any-return]


def _result(report: ModelReport, *, dataset: str, threat_model: str, eps: float) -> EvalResult:
    accuracy = dict(report.accuracy)
    attacked = {k: v for k, v in accuracy.items() if k != "clean"}
    robust = next((accuracy[k] for k in ("autoattack", "autoattack-quick") if k in accuracy), None)
    if robust is None and attacked:
        robust = min(attacked.values())
    paths = {
        role: path
        for role, path in (
            ("results", report.results_path),
            ("points", report.points_path),
            ("model_info", report.model_info_path),
            ("zoo_checkpoint", report.checkpoint_path),
            ("safetensors", report.safetensors_path),
            ("bundle", report.bundle_path),
        )
        if path is not None
    }
    return EvalResult(
        clean_accuracy=accuracy.get("clean"),
        robust_accuracy=robust,
        accuracy=accuracy,
        dataset=dataset,
        threat_model=threat_model,
        eps=eps,
        n_examples=report.n_examples,
        paths=paths,
        report=report,
    )
