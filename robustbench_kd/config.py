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
    [optim]      epochs, lr, momentum, weight_decay, nesterov, schedule, milestones, gamma, max_lr, pct_start,
                 div_factor
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
    [published]  clean, autoattack, source, tolerance, teacher_note   (a paper's numbers for `reproduce`; training
                                                                       ignores it)

Unknown sections or keys are errors that list the valid ones. Every value is checked when the
configuration is read (each section's ``__post_init__``, so configurations built in Python are checked
too): a NaN rate, a seed numpy refuses or a run name that cannot be a file name fails before anything is
written. A run file is read bounded (a regular file of at most 1 MiB, at most 100 000 values and 32
levels counting YAML aliases and merge keys as expanded) before anything copies it.

The sections that belong to one subsystem are defined there (``scale.sections``, ``analysis.*.section``,
``submission.section``) and assembled here, so this module sits above ``analysis``, ``evaluation``,
``submission`` and the layers below them, and below ``training``, ``jobs`` and ``cli``, which read the
whole :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from robustbench_kd.analysis.diagnostics.section import DiagnosticsSection
from robustbench_kd.analysis.reports.section import ReportSection
from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.scale.sections import EmaSection, SpeedSection
from robustbench_kd.storage.bounded import MiB, check_structure, read_text_bounded
from robustbench_kd.storage.names import check_output_dir
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.threat import COUNT_MAX, ThreatSpec, check_int, check_real, check_seed, parse_number
from robustbench_kd.zoo.names import validate_model_id

SCHEDULES = ("multistep", "cosine", "onecycle", "exponential", "constant")
SELECT_METRICS = ("pgd", "clean")  #: validation metrics eval.select may rank epochs by

#: Bounds of a run file: a real one is a few KB with a few hundred values four levels deep. They hold
#: as the file expands (YAML aliases and merge keys), before anything copies it.
RUN_FILE_LIMIT = 1 * MiB
RUN_FILE_MAX_VALUES = 100_000
RUN_FILE_MAX_DEPTH = 32
#: The largest integer a run file may hold anywhere: torch and numpy hold integers in 64 bits.
INT64_MAX = 2**63 - 1


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

    def __post_init__(self) -> None:
        try:
            validate_model_id(self.name)
        except UserError as exc:  # the name becomes model_info/.../<name>.json and models/.../<name>.pt
            raise UserError(f"run.name is not a usable model id: {exc}") from None
        check_output_dir(self.out_dir, what="run.out_dir")
        check_seed(self.seed, what="run.seed")


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
        check_output_dir(self.data_dir, what="data.data_dir")
        for key in ("batch_size", "test_batch_size"):
            check_int(getattr(self, key), what=f"data.{key}", low=1)
        if self.n_train is not None:
            check_int(self.n_train, what="data.n_train", low=1)
        if self.extra_path is not None and (not isinstance(self.extra_path, str) or not self.extra_path.strip()):
            raise UserError(f"data.extra_path must be the path of an .npz file, got {self.extra_path!r}")
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
            object.__setattr__(self, "val_size", check_int(int(v), what="data.val_size"))

    def _check_extra(self) -> None:
        f = self.extra_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:  # also catches NaN
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

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise UserError(f"student.options must be a table, got {self.options!r}")
        check_structure(self.options, what="student.options", max_nodes=RUN_FILE_MAX_VALUES, max_depth=8)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise UserError(f"student.init_from must be the path of a checkpoint, got {self.init_from!r}")


@dataclass(frozen=True, kw_only=True)
class ZooSection:
    model_dir: str = "./models"  #: RobustBench model directory (<model_dir>/<dataset>/<threat>/<name>.pt)
    allow_download: bool = False  #: let robustbench download missing zoo checkpoints

    def __post_init__(self) -> None:
        check_output_dir(self.model_dir, what="zoo.model_dir")


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
    div_factor: float = 25.0  #: onecycle starts at max_lr / div_factor (PyTorch's default, 25)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
                f"{close_matches(self.schedule, SCHEDULES)}"
            )
        check_int(self.epochs, what="optim.epochs", low=1)
        check_real(self.lr, what="optim.lr", low=0, low_open=True)
        check_real(self.momentum, what="optim.momentum", low=0, high=1, high_open=True)
        check_real(self.weight_decay, what="optim.weight_decay", low=0)
        check_real(self.gamma, what="optim.gamma", low=0, high=1, low_open=True, rule="in (0, 1] (it lowers lr)")
        if self.max_lr is not None:
            check_real(self.max_lr, what="optim.max_lr", low=0, low_open=True)
        check_real(self.pct_start, what="optim.pct_start", low=0, high=1, low_open=True, high_open=True)
        check_real(self.div_factor, what="optim.div_factor", low=1, rule=">= 1 (the start is max_lr / div_factor)")
        self._check_milestones()

    def _check_milestones(self) -> None:
        """Positive, increasing epochs. A milestone beyond ``epochs`` is kept: it never fires, and a run
        shortened with ``--set optim.epochs=1`` keeps its file's milestones."""
        ms = self.milestones
        if not isinstance(ms, (list, tuple)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= COUNT_MAX for m in ms
        ):
            raise UserError(f"optim.milestones must be positive epochs, got {_short(ms)}")
        if any(b <= a for a, b in itertools.pairwise(ms)):
            raise UserError(f"optim.milestones must be increasing epochs, each once, e.g. [100, 150], got {list(ms)}")


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 0  #: also keep checkpoints/epoch_NNN.pt every N epochs (0: only last.pt)
    every_steps: int = 0  #: also rewrite last.pt every N optimiser steps, mid-epoch (0: off)

    def __post_init__(self) -> None:
        for key in ("every", "every_steps"):
            check_int(getattr(self, key), what=f"checkpoint.{key}")


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
        check_int(self.every, what="eval.every")
        for key in ("n_examples", "pgd_steps", "batch_size"):
            check_int(getattr(self, key), what=f"eval.{key}", low=1)
        if self.final_n_examples is not None:
            check_int(self.final_n_examples, what="eval.final_n_examples", low=1)
        check_seed(self.seed, what="eval.seed")
        if not isinstance(self.attacks, (list, tuple)):
            raise UserError(f"eval.attacks must be a list of attack names, got {self.attacks!r}")
        from robustbench_kd.evaluation.runner import VALID_ATTACKS  # fail now, not after training

        for name in self.attacks:
            if name not in VALID_ATTACKS:
                raise UserError(
                    f"unknown attack {name!r} in eval.attacks{close_matches(str(name), VALID_ATTACKS)}; "
                    f"valid attacks: {', '.join(VALID_ATTACKS)}"
                )


@dataclass(frozen=True, kw_only=True)
class PublishedSection:
    """The numbers a paper published for the setting a run file reproduces (``robustbench-kd reproduce``).

    Nothing here changes training or evaluation, and a resume ignores it (it is no key a checkpoint is
    compared on), so correcting a number or the source never blocks ``--resume``. Accuracies are percent of
    the test set, as papers print them; unset means the paper gives no such number for this setting.

    A reproduction with final test accuracies ``m`` (percent) counts as reproduced when every published
    metric ``p`` satisfies ``|m - p| <= tolerance``. The default of 1.0 point covers the seed-to-seed spread
    of a CIFAR-10 student's AutoAttack accuracy (standard deviations of about 0.1-0.6 points across
    training seeds in the papers that report them) plus the nondeterminism of GPU kernels, which changes
    the trained weights from run to run even at a fixed seed.
    """

    clean: float | None = None  #: published clean accuracy, percent
    autoattack: float | None = None  #: published AutoAttack accuracy, percent
    source: str = ""  #: where the numbers are printed: "paper, table N, row"
    tolerance: float = 1.0  #: points the reproduction may differ by and still count as reproduced
    teacher_note: str = ""  #: how the run's teacher differs from the paper's, e.g. "closest zoo entry"

    def __post_init__(self) -> None:
        for key in ("clean", "autoattack"):
            value = getattr(self, key)
            if value is not None:
                number = check_real(value, what=f"published.{key}", low=0, high=100, rule="a percentage in [0, 100]")
                object.__setattr__(self, key, number)
        tolerance = check_real(
            self.tolerance, what="published.tolerance", low=0, high=100, low_open=True, rule="in (0, 100] points"
        )
        object.__setattr__(self, "tolerance", tolerance)
        for key in ("source", "teacher_note"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise UserError(f"published.{key} must be a string, got {_short(value)}")
            if any(ch in value for ch in "\n\r"):
                raise UserError(
                    f"published.{key} must be one line (it ends the reproduce verdict), got {_short(value)}"
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
    "published": PublishedSection,  # a paper's numbers for `reproduce`; never read by training
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
    published: PublishedSection = field(default_factory=PublishedSection)

    def __post_init__(self) -> None:
        # The free sections are copied as they are (to_dict, asdict): bounded first, as a run file is.
        for section in FREE_SECTIONS:
            values = getattr(self, section)
            if not isinstance(values, Mapping):
                raise UserError(f"[{section}] must be a table, got {_short(values)}")
            check_structure(
                values, what=f"[{section}]", max_nodes=RUN_FILE_MAX_VALUES, max_depth=RUN_FILE_MAX_DEPTH - 1
            )
        if "name" not in self.method:
            raise UserError('[method] needs a name, e.g. name = "rslad" (see `robustbench-kd methods`)')
        if not isinstance(self.method["name"], str):
            raise UserError(f"method.name must be a string (see `robustbench-kd methods`), got {self.method['name']!r}")
        _check_teachers(self.teachers)

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
        raise UserError(f"{where} must be an integer, got {_short(value)}")
    if "bool" in text:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {_short(value)}")
    if text.startswith("str") or text == "<class 'str'>":
        if isinstance(value, str):
            return value
        raise UserError(f"{where} must be a string, got {_short(value)}")
    if text.startswith("list"):
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {_short(value)}")
        if "int" in text and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where} must be a list of integers, got {_short(value)}")
        if "float" in text:
            return [parse_number(v, what=f"{where}[{i}]") for i, v in enumerate(value)]
        if "str" in text and not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} must be a list of strings, got {_short(value)}")
        return list(value)
    if text.startswith("dict"):
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a table/mapping, got {_short(value)}")
        return dict(value)
    raise UserError(f"{where} has an unsupported value {_short(value)}")


def section_from_mapping(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """Build a section dataclass strictly: unknown keys and wrong types are UserErrors."""
    if not isinstance(values, Mapping):
        raise UserError(f"[{section}] must be a table, got {_short(values)}")
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
    raw = plain_copy(raw, what="the run configuration")
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
                raise UserError(f"[{section}] must be a table, got {_short(values)}")
            kwargs[section] = dict(values)
        else:
            raise UserError(f"unknown section [{section}]{close_matches(section, valid)}; valid: {', '.join(valid)}")
    if "threat" not in kwargs:
        kwargs["threat"] = default_threat(kwargs.get("data", DataSection()).dataset)
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
            _check_weights(spec.get("weights"), where=f"{where}.weights")
            vectorize = spec.get("vectorize", "auto")
            if vectorize != "auto" and not isinstance(vectorize, bool):
                raise UserError(f'{where}.vectorize must be "auto", true or false, got {vectorize!r}')
            continue
        raise UserError(
            f"{where} must be a spec string, a list of specs, or a table {{specs=[...], weights=[...]}}; "
            f"got {_short(spec)}"
        )


def _check_weights(weights: Any, *, where: str) -> None:
    """Ensemble weights: finite, non-negative numbers, not all zero (None: equal weights)."""
    if weights is None:
        return
    if not isinstance(weights, list) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
    ):
        raise UserError(f"{where} must be a list of finite numbers >= 0, got {_short(weights)}")
    if weights and not any(weights):
        raise UserError(f"{where} are all zero; give at least one teacher a positive weight")


def _short(value: Any) -> str:
    """``repr`` for a message, cut to one short line."""
    shown = repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


# -- files and overrides -------------------------------------------------------------------------
def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) run file into a mapping.

    The file is read bounded (a regular file of at most :data:`RUN_FILE_LIMIT`: a FIFO, a device or a
    huge file is refused before it is read) and its structure is checked as expanded (YAML aliases and
    merge keys) before anything copies it; see :func:`plain_copy`.
    """
    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        raise UserError(f"config file {path} must end in .toml, .yaml or .yml")
    text = read_text_bounded(path, limit=RUN_FILE_LIMIT, what="config file")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else _load_yaml(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply to be a run file") from None
    except ValueError as exc:  # Python refuses to convert an integer of more than 4300 digits
        if "integer string conversion" not in str(exc):
            raise UserError(f"config file {path} could not be parsed: {_one_line(exc)}") from None
        raise UserError(f"config file {path} holds an integer of more than 4300 digits") from None
    except _MergeBomb:
        raise UserError(
            f"config file {path} expands to more than {RUN_FILE_MAX_VALUES:,} values through YAML merge keys "
            "(<<); write the values out"
        ) from None
    except Exception as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"config file {path} could not be parsed: {_one_line(exc)}") from None
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return plain_copy(data, what=f"config file {path}", prefix=f"config file {path}: ")


def plain_copy(raw: Mapping[str, Any], *, what: str, prefix: str = "") -> dict[str, Any]:
    """A checked, unshared copy of a run mapping: what a run file may hold, and only that.

    First the structure is bounded as expanded (:func:`~robustbench_kd.storage.bounded.check_structure`:
    at most :data:`RUN_FILE_MAX_VALUES` values and :data:`RUN_FILE_MAX_DEPTH` levels), so the copy of a
    1 KB file of nested YAML aliases cannot grow to gigabytes. Then every value is copied, refusing what
    no run file means: keys that are not strings, NaN or infinite numbers, integers beyond 64 bits and
    other types a YAML or TOML parser builds (dates, bytes, sets). The copy shares nothing, so a
    ``--set`` on one place of an aliased table does not change the others. ``what`` names the mapping
    in the structure messages, ``prefix`` starts the messages about one value (``"config file a.toml: "``).
    """
    check_structure(raw, what=what, max_nodes=RUN_FILE_MAX_VALUES, max_depth=RUN_FILE_MAX_DEPTH)
    try:
        return _plain(raw, "")
    except _BadValue as exc:
        raise UserError(f"{prefix}{exc}") from None


class _BadValue(Exception):
    """A value no run file may hold; :func:`plain_copy` names where it came from."""


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _BadValue(f"the key {key!r} in {where or 'the run file'} must be a string (quote it)")
            out[key] = _plain(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if abs(value) > INT64_MAX:
            raise _BadValue(f"{where} must fit a 64-bit integer, got {_shown_int(value)}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _BadValue(f"{where} must be a finite number, got {value}")
        return value
    raise _BadValue(
        f"{where} is a {type(value).__name__} ({_short(value)}); a run file holds strings, numbers, "
        "true/false, lists and tables"
    )


def _shown_int(value: int) -> str:
    return f"a {int(value.bit_length() * math.log10(2)) + 1}-digit number" if value.bit_length() > 100 else str(value)


class _MergeBomb(Exception):
    """YAML merge keys that would copy more than the run file's value budget."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with a budget on merge keys, the one YAML construct that copies while parsing.

    Aliases are shared (bounded afterwards by :func:`plain_copy`), but ``<<: [*a, *a, ...]`` copies the
    merged pairs, and merges of merges multiply: a few hundred bytes would fill the memory before any
    check could see the result.
    """
    import yaml  # lazily: only YAML users pay for it

    class BoundedLoader(yaml.SafeLoader):
        budget = RUN_FILE_MAX_VALUES

        def flatten_mapping(self, node: Any) -> None:
            self.budget -= _merge_cost(node, self.budget)
            if self.budget < 0:
                raise _MergeBomb
            super().flatten_mapping(node)

    return yaml.load(text, Loader=BoundedLoader)  # a SafeLoader: plain data only


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _merge_cost(node: Any, budget: int) -> int:
    """How many pairs flattening ``node``'s merge keys copies in; stops counting past ``budget``."""
    import yaml

    cost = 0
    stack = [value for key, value in node.value if key.tag == _MERGE_TAG]
    while stack and cost <= budget:
        sub = stack.pop()
        cost += 1
        if isinstance(sub, yaml.SequenceNode):
            stack.extend(sub.value)
        elif isinstance(sub, yaml.MappingNode):
            cost += len(sub.value)
            stack.extend(value for key, value in sub.value if key.tag == _MERGE_TAG)
    return cost


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
    except RecursionError:
        raise UserError(f"--set value {_short(text)} is nested too deeply") from None
    except (tomllib.TOMLDecodeError, ValueError):  # ValueError: an integer of more than 4300 digits
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (in a checked, unshared copy: :func:`plain_copy`)."""
    data = plain_copy(raw, what="the run configuration")
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
