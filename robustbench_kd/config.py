"""Run configuration: strict dataclasses, TOML/YAML files, ``--set a.b=c`` overrides.

A run file has these sections (all optional; defaults give a CPU run on the embedded digits data)::

    [run]        name, out_dir, seed, device, deterministic, progress, sync_bn
    [data]       dataset, data_dir, download, verify_md5, batch_size, test_batch_size, augment, n_train, val_size,
                 extra_path, extra_fraction, preprocessing
    [threat]     norm, eps, alpha, steps                     (eps/alpha accept "8/255")
    [student]    arch, options = {...}, init_from
    [teachers]   <role> = "scheme:ref"  or  <role> = {specs = [...], weights = [...], combine = "probs",
                                                           vectorize = "auto"}
    [zoo]        model_dir, allow_download
    [method]     name, then the method's own options (see `robustbench-kd methods --options NAME`)
    [optim]      epochs, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma, max_lr, pct_start
    [checkpoint] every, every_steps
    [eval]       every, select, n_examples, pgd_steps, attacks, final_n_examples, teachers, batch_size, seed,
                 sanity
    [model_info] title, authors, venue, link, architecture, additional_data, reported, footnote, number_forward_passes
                                                      (robustbench_kd.submission.section)
    [speed]      amp, attack_fp32, channels_last, compile, compile_backend   (robustbench_kd.scale.sections)
    [ema]        decay, warmup, every                                       (robustbench_kd.scale.sections)
    [diagnostics] enabled, n_examples, every, adversarial, pgd_steps, bins, batch_size, seed, tensorboard
                                                      (robustbench_kd.analysis.diagnostics.section; off by default)
    [report]     enabled, n_examples, n_cam, eps_factors, pgd_steps, embedding (robustbench_kd.analysis.reports)

Unknown sections or keys are errors that list the valid ones.

The sections that belong to one subsystem are defined there (``scale.sections``, ``analysis.*.section``,
``submission.section``) and assembled here, so this module sits above ``analysis``, ``evaluation``,
``submission`` and the layers below them, and below ``training``, ``jobs`` and ``cli``, which read the
whole :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from robustbench_kd.analysis.diagnostics.section import DiagnosticsSection
from robustbench_kd.analysis.reports.section import ReportSection
from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.scale.sections import EmaSection, SpeedSection
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.threat import ThreatSpec, parse_number

SCHEDULES = ("multistep", "cosine", "onecycle", "exponential", "constant")
SELECT_METRICS = ("pgd", "clean")  #: validation metrics eval.select may rank epochs by


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """Run identity and environment."""

    name: str = "rbkd_student"  #: model id used for model_info/<...>/<name>.json and the zoo file
    out_dir: str = "runs/rbkd_student"  #: where checkpoints, metrics, model_info and models are written
    seed: int = 0
    device: str = "auto"  #: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    deterministic: bool = False  #: torch.use_deterministic_algorithms (slower on GPU)
    progress: bool = True  #: tqdm progress bars
    sync_bn: bool = False  #: torchrun/DDP: BatchNorm statistics over the global batch (scale.sync_bn)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Training and test data."""

    dataset: str = "digits"
    data_dir: str = "./data"
    download: bool = False  #: download CIFAR when missing (needs network)
    verify_md5: bool = True  #: check CIFAR files against torchvision's MD5 sums
    batch_size: int = 64
    test_batch_size: int = 256
    augment: bool | None = None  #: random crop + flip; None = on for CIFAR, off for digits
    n_train: int | None = None  #: use only the first n training examples (debugging)
    #: held out of the training set for eval.every and best.pt: a fraction in (0, 1) or a count of images;
    #: drawn with a fixed seed (not run.seed) before n_train applies; never augmented
    val_size: int | float = 0
    #: an uncompressed .npz of extra (e.g. generated) training images + labels, memory-mapped
    extra_path: str | None = None
    #: share of every training batch drawn from extra_path: round(batch_size * extra_fraction) images
    extra_fraction: float = 0.0
    #: imagenet only: RobustBench's preprocessing name (Res256Crop224, BicubicRes256Crop224, Res224, Crop288);
    #: None = Res256Crop224
    preprocessing: str | None = None

    def __post_init__(self) -> None:
        for key in ("batch_size", "test_batch_size"):
            if getattr(self, key) < 1:
                raise UserError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        self._check_extra()
        if self.preprocessing is not None and self.dataset != "imagenet":
            raise UserError(
                f"data.preprocessing applies to dataset imagenet only (RobustBench's ImageNet "
                f"preprocessings); remove it for {self.dataset!r}"
            )
        v = self.val_size
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or not v >= 0 or (v >= 1 and not float(v).is_integer()):  # `not v >= 0` catches NaN
            raise UserError(
                f"data.val_size must be 0 (no validation split), a fraction in (0, 1) or a whole "
                f"number of training images, got {v!r}"
            )
        if v == 0 or v >= 1:
            # Files give 1000 as a float (the field also takes fractions); keep counts as ints.
            object.__setattr__(self, "val_size", int(v))

    def _check_extra(self) -> None:
        f = self.extra_fraction
        if not 0 <= f < 1:  # also catches NaN
            raise UserError(
                f"data.extra_fraction must be in [0, 1) (the share of each batch from extra_path), got {f!r}"
            )
        if (self.extra_path is None) != (f == 0):
            raise UserError(
                "data.extra_path and data.extra_fraction go together: set both (e.g. extra_fraction "
                '= 0.7 with extra_path = "5m.npz") or neither'
            )
        if self.extra_path is not None:
            from robustbench_kd.data.extra import (
                batch_split,  # the one definition of the split; imports torch, so only here
            )

            real, extra = batch_split(self.batch_size, f)
            if extra == 0 or real == 0:
                raise UserError(
                    f"data.extra_fraction = {f} of data.batch_size = {self.batch_size} gives {extra} extra "
                    f"and {real} real images per batch; both must be at least 1"
                )


@dataclass(frozen=True, kw_only=True)
class StudentSection:
    arch: str = "small-cnn"
    options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  #: start from these weights (a checkpoint path): fine-tuning stages


@dataclass(frozen=True, kw_only=True)
class ZooSection:
    model_dir: str = "./models"  #: RobustBench model directory (<model_dir>/<dataset>/<threat>/<name>.pt)
    allow_download: bool = False  #: let robustbench download missing zoo checkpoints


@dataclass(frozen=True, kw_only=True)
class OptimSection:
    """SGD and its learning-rate schedule."""

    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "multistep"  #: multistep | cosine | onecycle | exponential | constant
    milestones: list[int] = field(default_factory=list)  #: epochs where multistep multiplies lr by gamma
    gamma: float = 0.1  #: multistep factor; per-epoch factor for exponential
    max_lr: float | None = None  #: onecycle peak (default: lr)
    pct_start: float = 0.3  #: onecycle share of the rising phase

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
                f"{close_matches(self.schedule, SCHEDULES)}"
            )
        if self.epochs < 1:
            raise UserError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise UserError(f"optim.lr must be positive, got {self.lr}")
        if any(m <= 0 for m in self.milestones):
            raise UserError(f"optim.milestones must be positive epochs, got {self.milestones}")


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 0  #: also keep checkpoints/epoch_NNN.pt every N epochs (0: only last.pt)
    every_steps: int = 0  #: also rewrite last.pt every N optimiser steps, mid-epoch (0: off)

    def __post_init__(self) -> None:
        for key in ("every", "every_steps"):
            if getattr(self, key) < 0:
                raise UserError(f"checkpoint.{key} must be >= 0 (0: off), got {getattr(self, key)}")


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """Evaluation during and after training."""

    #: clean + PGD check on n_examples validation points every N epochs (needs data.val_size)
    every: int = 0
    select: str = "pgd"  #: best.pt = the epoch with the best validation "pgd" (or "clean") accuracy
    n_examples: int = 256
    pgd_steps: int = 20
    attacks: list[str] = field(default_factory=lambda: ["clean", "pgd", "autoattack"])  #: final evaluation
    final_n_examples: int | None = None  #: None = the whole test set (the leaderboard protocol)
    teachers: bool = True  #: also evaluate the teachers at the end (reported beside the student)
    batch_size: int = 256
    seed: int = 0
    sanity: bool = True  #: run the evaluation sanity suite (gradient masking) before writing results

    def __post_init__(self) -> None:
        if self.select not in SELECT_METRICS:
            raise UserError(
                f"eval.select must be one of {', '.join(SELECT_METRICS)}, got {self.select!r}"
                f"{close_matches(self.select, SELECT_METRICS)}"
            )
        if self.every < 0:
            raise UserError(f"eval.every must be >= 0 (0: no evaluation during training), got {self.every}")
        from robustbench_kd.evaluation.runner import VALID_ATTACKS  # fail now, not after training

        for name in self.attacks:
            if name not in VALID_ATTACKS:
                raise UserError(
                    f"unknown attack {name!r} in eval.attacks{close_matches(str(name), VALID_ATTACKS)}; "
                    f"valid attacks: {', '.join(VALID_ATTACKS)}"
                )


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "threat": ThreatSpec,
    "student": StudentSection,
    "zoo": ZooSection,
    "optim": OptimSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "model_info": ModelInfoSection,
    "speed": SpeedSection,
    "ema": EmaSection,  # precision/compile switches, weight averaging
    "diagnostics": DiagnosticsSection,  # per-epoch diagnostics (observer plugin), off by default
    "report": ReportSection,  # end-of-run analyses and report
}
FREE_SECTIONS = ("teachers", "method")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole, validated configuration of one run."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    threat: ThreatSpec = field(default_factory=lambda: ThreatSpec(eps=0.2, alpha=0.05, steps=10))
    student: StudentSection = field(default_factory=StudentSection)
    teachers: dict[str, Any] = field(default_factory=dict)
    zoo: ZooSection = field(default_factory=ZooSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "pgd-at"})
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    model_info: ModelInfoSection = field(default_factory=ModelInfoSection)
    speed: SpeedSection = field(default_factory=SpeedSection)
    ema: EmaSection = field(default_factory=EmaSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)
    report: ReportSection = field(default_factory=ReportSection)

    @property
    def method_name(self) -> str:
        return str(self.method["name"])

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what is saved as the resolved config)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# -- parsing -------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value against a field annotation (the few types configs use)."""
    text = str(annotation)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} must not be empty")
    if "float" in text and "list" not in text and "dict" not in text:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return parse_number(value, what=where)
    if text.startswith("int") or text == "<class 'int'>" or text.startswith("int |"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where} must be an integer, got {value!r}")
    if "bool" in text:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if text.startswith("str") or text == "<class 'str'>":
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {value!r}")
    if text.startswith("list"):
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        if "int" in text and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where} must be a list of integers, got {value!r}")
        return list(value)
    if text.startswith("dict"):
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a table/mapping, got {value!r}")
        return dict(value)
    raise UserError(f"{where} has an unsupported value {value!r}")


def section_from_mapping(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Build a section dataclass strictly: unknown keys and wrong types are UserErrors."""
    if not isinstance(values, Mapping):
        raise UserError(f"[{section}] must be a table, got {values!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"unknown key {section}.{key}{close_matches(key, fields)}; valid keys in [{section}]: "
                f"{', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_mapping(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a whole run mapping into a :class:`RunConfig`."""
    valid = sorted([*SECTIONS, *FREE_SECTIONS])
    kwargs: dict[str, Any] = {}
    for section, values in raw.items():
        if section == "threat" and isinstance(values, Mapping):
            # A partial [threat] keeps the dataset's defaults for the keys it does not set.
            data = raw.get("data")
            dataset = data.get("dataset", DataSection.dataset) if isinstance(data, Mapping) else DataSection.dataset
            values = {**dataclasses.asdict(default_threat(str(dataset))), **values}
            kwargs[section] = section_from_mapping(ThreatSpec, values, section)
        elif section in SECTIONS:
            kwargs[section] = section_from_mapping(SECTIONS[section], values, section)
        elif section in FREE_SECTIONS:
            if not isinstance(values, Mapping):
                raise UserError(f"[{section}] must be a table, got {values!r}")
            kwargs[section] = dict(values)
        else:
            raise UserError(f"unknown section [{section}]{close_matches(section, valid)}; valid: {', '.join(valid)}")
    if "threat" not in kwargs:
        kwargs["threat"] = default_threat(kwargs.get("data", DataSection()).dataset)
    method = kwargs.get("method", {"name": "pgd-at"})
    if "name" not in method:
        raise UserError('[method] needs a name, e.g. name = "rslad" (see `robustbench-kd methods`)')
    _check_teachers(kwargs.get("teachers", {}))
    return RunConfig(**kwargs)


def default_threat(dataset: str) -> ThreatSpec:
    """Leaderboard-style defaults: 8/255 L_inf for CIFAR, 4/255 for ImageNet, 0.2 for the 8x8 digits.

    0.2 on the [0, 1] digits separates a standard model (0% under AutoAttack) from an adversarially trained one.
    """
    if dataset == "digits":
        return ThreatSpec(norm="Linf", eps=0.2, alpha=0.05, steps=10)
    if dataset == "imagenet":  # RobustBench's ImageNet Linf leaderboard
        return ThreatSpec(norm="Linf", eps=4 / 255, alpha=1 / 255, steps=10)
    return ThreatSpec(norm="Linf", eps=8 / 255, alpha=2 / 255, steps=10)


def _check_teachers(teachers: Mapping[str, Any]) -> None:
    for role, spec in teachers.items():
        where = f"teachers.{role}"
        if isinstance(spec, str):
            continue
        if isinstance(spec, list) and all(isinstance(s, str) for s in spec):
            continue
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"specs", "weights", "combine", "vectorize"}
            if unknown:
                raise UserError(f"unknown key {where}.{sorted(unknown)[0]}; valid: specs, weights, combine, vectorize")
            specs = spec.get("specs")
            if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
                raise UserError(f"{where}.specs must be a non-empty list of teacher spec strings")
            weights = spec.get("weights")
            if weights is not None and (
                not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights)
            ):
                raise UserError(f"{where}.weights must be a list of numbers")
            vectorize = spec.get("vectorize", "auto")
            if vectorize != "auto" and not isinstance(vectorize, bool):
                raise UserError(f'{where}.vectorize must be "auto", true or false, got {vectorize!r}')
            continue
        raise UserError(
            f"{where} must be a spec string, a list of specs, or a table {{specs=[...], weights=[...]}}; got {spec!r}"
        )


# -- files and overrides -------------------------------------------------------------------------
def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) run file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml  # lazily: only YAML users pay for it

            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise UserError(f"config file {path} must hold a mapping at the top level")
            return data
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"config file {path} could not be parsed: {_one_line(exc)}") from None
    raise UserError(f"config file {path} must end in .toml, .yaml or .yml")


def _one_line(exc: Exception) -> str:
    """A parser error in one line: YAML's own is several (context, caret, problem) with a position."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def parse_override_value(text: str) -> Any:
    """``--set`` values are TOML literals (``0.1``, ``true``, ``[1, 2]``, ``"x"``); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (in a copy)."""
    data = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value (e.g. optim.lr=0.1), got {item!r}")
        parts = [p.strip() for p in key.split(".")]
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {key}: {part!r} is not a table")
            node = nxt
        node[parts[-1]] = parse_override_value(value.strip())
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, base: Mapping[str, Any] | None = None
) -> RunConfig:
    """File (or ``base`` mapping) + overrides -> validated RunConfig."""
    raw = dict(base or {})
    if path is not None:
        raw = load_file(path)
    return config_from_mapping(apply_overrides(raw, list(overrides or [])))
