"""Make ``import robustbench`` work with what PyPI actually serves.

robustbench 1.1.1 from PyPI imports ``pkg_resources`` (gone from setuptools>=81) and
``from autoattack import AutoAttack`` / ``from autoattack.state import EvaluationState``, while its
declared dependency ``pyautoattack`` installs a top-level package named ``pyautoattack`` whose
``AutoAttack`` has a different, keyword-only API. :func:`install` bridges both gaps:

* a real fra31 ``autoattack`` (``pip install git+https://github.com/fra31/auto-attack``) is used
  untouched when it is importable;
* otherwise a module named ``autoattack`` is registered in :data:`sys.modules` whose ``AutoAttack``
  is an adapter with fra31's signature over ``pyautoattack.autoattack.AutoAttack``, and whose
  submodules (``autoattack.state``, ``autoattack.checks``, ...) are pyautoattack's.

``robustbench_kd.zoo.compat.AutoAttack`` always has fra31's API, whichever backend is installed, so our
own evaluation code can be written once against it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import logging
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.zoo.autoattack_resume import read_autoattack_state, run_resumable

if TYPE_CHECKING:
    import torch

    #: fra31's ``AutoAttack`` class of the backend in use; resolved by the module ``__getattr__`` below.
    AutoAttack: type

__all__ = ["AutoAttack", "autoattack_version", "import_robustbench", "install"]

logger = logging.getLogger(__name__)

# Set on the module we register, so a second install() (or a later import of this module under
# another name) recognises it and never mistakes it for fra31's package.
_SHIM_FLAG = "__robustbench_kd_shim__"

# Submodules of fra31's package that have a same-named twin in pyautoattack. robustbench itself only
# imports ``autoattack.state``; the others are aliased for user code written against fra31. The TF
# helpers (fab_tf, utils_tf*) are left out because importing them needs TensorFlow.
_SUBMODULES = ("state", "checks", "autopgd_base", "fab_base", "fab_projections", "fab_pt", "square", "other_utils")

ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
VERSIONS = ("standard", "plus", "rand", "custom")
NORMS = ("Linf", "L2", "L1")

# Warnings that importing robustbench 1.1.1 / timm 1.0.9 emits on every run and that a user cannot
# act on (they come from third-party code, not from the user's call).
_IMPORT_NOISE: tuple[tuple[Literal["ignore"], str, type[Warning]], ...] = (
    ("ignore", r"pkg_resources is deprecated", UserWarning),
    ("ignore", r"`?torch\.jit\.interface`? is deprecated", FutureWarning),
    ("ignore", r"Importing from timm\.models\.", DeprecationWarning),
    ("ignore", r"Importing from timm\.models\.", FutureWarning),
)


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    with warnings.catch_warnings():
        for action, message, category in _IMPORT_NOISE:
            warnings.filterwarnings(action, message=message, category=category)
        yield


def _require_pkg_resources() -> None:
    try:
        with _quiet_imports():
            import pkg_resources  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "robustbench 1.1.1 needs pkg_resources, which setuptools>=81 removed; run: pip install 'setuptools<81'"
        ) from exc


def _is_shim(module: types.ModuleType | None) -> bool:
    return module is not None and bool(getattr(module, _SHIM_FLAG, False))


def _is_fra31(module: types.ModuleType | None) -> bool:
    """True when ``module`` looks like fra31's ``autoattack`` (not our shim, not a pyautoattack alias)."""
    if module is None or _is_shim(module):
        return False
    cls = getattr(module, "AutoAttack", None)
    if not inspect.isclass(cls) or cls.__module__.startswith("pyautoattack"):
        return False
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return "attacks_to_run" in params and "is_tf_model" in params


def _find_real_autoattack() -> types.ModuleType | None:
    """Import fra31's ``autoattack`` if one is installed; None when absent or not fra31's."""
    current = sys.modules.get("autoattack")
    if current is not None:
        return current if _is_fra31(current) else None
    try:
        module = importlib.import_module("autoattack")
    except ModuleNotFoundError as exc:
        if exc.name != "autoattack":
            # The package exists but one of its own imports is missing: report it, use the shim.
            logger.warning(
                "an 'autoattack' package is installed but cannot be imported (%s); using pyautoattack instead", exc
            )
            _forget_autoattack_modules()
        return None
    except Exception as exc:  # a broken third-party install must not block robustbench
        logger.warning(
            "an 'autoattack' package is installed but cannot be imported (%s: %s); using pyautoattack instead",
            type(exc).__name__,
            exc,
        )
        _forget_autoattack_modules()
        return None
    if _is_fra31(module):
        return module
    logger.info(
        "the installed 'autoattack' module (%s) is not fra31's AutoAttack; shadowing it with the pyautoattack adapter",
        getattr(module, "__file__", "?"),
    )
    return None


def _forget_autoattack_modules() -> None:
    for key in [k for k in sys.modules if k == "autoattack" or k.startswith("autoattack.")]:
        del sys.modules[key]


def _register_shim() -> types.ModuleType:
    try:
        import pyautoattack
    except ImportError as exc:
        raise UserError(
            "neither fra31's autoattack nor pyautoattack is importable; run: pip install 'pyautoattack>=0.2.0,<0.3'"
        ) from exc
    _forget_autoattack_modules()
    shim = types.ModuleType(
        "autoattack",
        "robustbench_kd shim: fra31's autoattack API on top of pyautoattack "
        f"{getattr(pyautoattack, '__version__', 'unknown')}.",
    )
    setattr(shim, _SHIM_FLAG, True)
    shim.__version__ = getattr(pyautoattack, "__version__", "unknown")  # type: ignore[attr-defined]
    shim.AutoAttack = _adapter_class()  # type: ignore[attr-defined]
    # Without __path__ the import system would refuse ``import autoattack.x`` for any x we do not
    # register; an empty path makes unknown submodules fail with a plain ModuleNotFoundError.
    shim.__path__ = []  # type: ignore[attr-defined]
    for sub in _SUBMODULES:
        module = _state_module() if sub == "state" else importlib.import_module(f"pyautoattack.{sub}")
        setattr(shim, sub, module)
        sys.modules[f"autoattack.{sub}"] = module
    sys.modules["autoattack"] = shim
    logger.debug("registered the 'autoattack' shim over pyautoattack %s", shim.__version__)
    return shim


def _state_module() -> types.ModuleType:
    """``autoattack.state`` of the shim: pyautoattack's module with a working ``EvaluationState``.

    robustbench's ``benchmark(aa_state_path=...)`` reads the state file back with
    ``EvaluationState.from_disk(path).robust_flags.mean()``. With pyautoattack 0.2.0 that fails twice:
    its own resume is broken (so the adapter writes our resumable format instead), and ``mean()`` of
    its bool flags raises. The class registered here reads our files (and AutoAttack's own) and
    returns flags whose ``mean()`` is the robust accuracy.
    """
    import pyautoattack.state as base

    module = types.ModuleType("autoattack.state", base.__doc__)
    module.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("__")})
    module.EvaluationState = _evaluation_state_class()  # type: ignore[attr-defined]
    return module


@functools.cache
def _evaluation_state_class() -> type:
    import torch
    from pyautoattack.state import EvaluationState as _Base

    class RobustFlags(torch.Tensor):
        """Bool robust flags whose ``mean()`` is the robust accuracy (torch refuses bool means)."""

        def mean(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
            return torch.Tensor.mean(self.as_subclass(torch.Tensor).float(), *args, **kwargs)

    class EvaluationState(_Base):  # type: ignore[misc, valid-type]
        """pyautoattack's ``EvaluationState`` whose ``from_disk`` reads resumable state files.

        Reads the files :func:`robustbench_kd.zoo.autoattack_resume.run_resumable` writes (what the
        adapter's ``run_standard_evaluation(state_path=...)`` produces) and AutoAttack's own, whose
        attack set is a string. The loaded object has ``path=None`` so that touching it never
        overwrites the file in AutoAttack's (lossy) format.
        """

        @classmethod
        def from_disk(cls, path: Path) -> EvaluationState:  # type: ignore[override]
            state = read_autoattack_state(path)
            return cls(
                _attacks_to_run=set(state.attacks),
                path=None,
                _run_attacks=set(state.completed),
                _robust_flags=state.robust.as_subclass(RobustFlags),
                _clean_accuracy=state.accuracy.get("clean", float("nan")),
            )

    EvaluationState.__module__ = "autoattack.state"
    return EvaluationState


def _install_autoattack() -> types.ModuleType:
    current = sys.modules.get("autoattack")
    if _is_shim(current):
        return current  # type: ignore[return-value]
    real = _find_real_autoattack()
    if real is not None:
        return real
    return _register_shim()


def install() -> None:
    """Make ``import robustbench`` work; safe to call any number of times.

    Raises :class:`UserError` when ``pkg_resources`` is missing (setuptools>=81). Leaves a real
    fra31 ``autoattack`` alone; otherwise registers the pyautoattack-backed ``autoattack`` module
    (replacing a bare ``autoattack -> pyautoattack`` alias, whose API robustbench's ``benchmark``
    cannot call).
    """
    _require_pkg_resources()
    _install_autoattack()


def import_robustbench() -> types.ModuleType:
    """Return the ``robustbench`` module, after :func:`install`.

    The deprecation warnings that robustbench 1.1.1 and timm 1.0.9 emit at import time are
    silenced, because they come from third-party code the user cannot change.
    """
    install()
    try:
        with _quiet_imports():
            import robustbench
    except ModuleNotFoundError as exc:
        if exc.name == "robustbench":
            raise UserError("robustbench is not installed; run: pip install robustbench==1.1.1") from exc
        raise
    return robustbench


def autoattack_version() -> str:
    """Describe the AutoAttack backend in use, e.g. ``"pyautoattack 0.2.0"``.

    For fra31's package: ``"autoattack (fra31) <version>"``, with ``unknown`` when the installed
    distribution carries no version.
    """
    module = _install_autoattack()
    if _is_shim(module):
        return f"pyautoattack {module.__version__}"
    try:
        version = importlib.metadata.version("autoattack")
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(module, "__version__", "unknown"))
    return f"autoattack (fra31) {version}"


def __getattr__(name: str) -> Any:
    # Resolved lazily so that importing this module stays cheap and the backend is chosen at use time.
    if name == "AutoAttack":
        return _install_autoattack().AutoAttack
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cuda_or_model_device(device: Any, model: Any) -> Any:
    """fra31 defaults to 'cuda'; on a machine without CUDA use the model's own device instead."""
    import torch

    wants_cuda = device is None or torch.device(device).type == "cuda"
    if not wants_cuda or (device is not None and torch.cuda.is_available()):
        return device
    try:
        found = next(iter(model.parameters())).device
    except (AttributeError, StopIteration):
        found = torch.device("cpu")
    if device is not None:
        logger.info("AutoAttack: device=%r requested but CUDA is not available; using %s", device, found)
    return found


class _Relay(logging.Handler):
    """Forward records at or above ``threshold`` to the handlers that saw them before."""

    def __init__(
        self, source: logging.Logger, handlers: list[logging.Handler], propagate: bool, threshold: int
    ) -> None:
        super().__init__(logging.NOTSET)
        self._source, self._handlers = source, handlers
        self._propagate, self._threshold = propagate, threshold

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self._threshold:
            return
        for handler in self._handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        if self._propagate and self._source.parent is not None:
            self._source.parent.callHandlers(record)


@contextlib.contextmanager
def _log_to_file(log_path: str | Path | None) -> Iterator[None]:
    """Write pyautoattack's full progress log to ``log_path``, as fra31's ``log_path`` did.

    pyautoattack logs progress at DEBUG on the ``auto-attack`` logger. Lowering that logger's level
    would also flood whatever console handlers the user configured, so for the duration of the call
    the existing handlers (and propagation) are routed through a relay that keeps the old threshold.
    """
    if log_path is None:
        yield
        return
    aa_logger = logging.getLogger("auto-attack")
    file_handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(message)s"))
    saved = (aa_logger.level, list(aa_logger.handlers), aa_logger.propagate)
    relay = _Relay(aa_logger, saved[1], saved[2], aa_logger.getEffectiveLevel())
    for handler in saved[1]:
        aa_logger.removeHandler(handler)
    aa_logger.addHandler(file_handler)
    aa_logger.addHandler(relay)
    aa_logger.setLevel(logging.DEBUG)
    aa_logger.propagate = False
    try:
        yield
    finally:
        aa_logger.removeHandler(relay)
        aa_logger.removeHandler(file_handler)
        file_handler.close()
        for handler in saved[1]:
            aa_logger.addHandler(handler)
        aa_logger.setLevel(saved[0])
        aa_logger.propagate = saved[2]


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(
            f"AutoAttack: unknown {kind} {value!r}{close_matches(str(value), choices)}; valid: {', '.join(choices)}"
        )


@functools.cache
def _adapter_class() -> type:
    """Build (once) the fra31-compatible subclass of pyautoattack's AutoAttack."""
    from pyautoattack.autoattack import AutoAttack as _PyAutoAttack

    class AutoAttack(_PyAutoAttack):  # type: ignore[misc, valid-type]
        """fra31's ``autoattack.AutoAttack`` API, running pyautoattack's (identical) attacks.

        Differences from fra31: ``is_tf_model=True`` is refused (pyautoattack dropped TensorFlow);
        ``device='cuda'`` falls back to the model's device when CUDA is unavailable; progress goes to
        the ``auto-attack`` logger (DEBUG) instead of stdout, and to ``log_path`` when given;
        ``run_standard_evaluation_individual`` restores ``attacks_to_run`` and ``verbose`` afterwards.
        """

        attacks_to_run: list[str]  # set by pyautoattack's constructor

        def __init__(
            self,
            model: torch.nn.Module,
            norm: str = "Linf",
            eps: float = 0.3,
            seed: int | None = None,
            verbose: bool = True,
            attacks_to_run: Sequence[str] = (),
            version: str = "standard",
            is_tf_model: bool = False,
            device: Any = "cuda",
            log_path: str | Path | None = None,
        ) -> None:
            if is_tf_model:
                raise UserError(
                    "AutoAttack: is_tf_model=True needs fra31's autoattack "
                    "(pip install git+https://github.com/fra31/auto-attack); "
                    "pyautoattack supports PyTorch models only"
                )
            _check_choice("norm", norm, NORMS)
            _check_choice("version", version, VERSIONS)
            attacks = list(attacks_to_run or ())
            for attack in attacks:
                _check_choice("attack", attack, ATTACK_NAMES)
            if version != "custom" and attacks:
                raise UserError(
                    f"AutoAttack: attacks_to_run={attacks} is ignored by version={version!r}; "
                    "pass version='custom' to choose the attacks"
                )
            super().__init__(
                model,
                attacks=attacks if version == "custom" else None,
                device=_cuda_or_model_device(device, model),
                eps=eps,
                norm=norm,
                seed=seed,
                version=version,
            )
            self.verbose = verbose
            self.is_tf_model = False
            self.log_path = log_path

        def set_version(self, version: str = "standard") -> None:
            """fra31's public name for switching to a preset ('standard', 'plus' or 'rand')."""
            _check_choice("version", version, VERSIONS[:3])
            self.version = version
            self._set_version(version)

        def run_standard_evaluation(
            self,
            x_orig: torch.Tensor,
            y_orig: torch.Tensor,
            bs: int = 250,
            return_labels: bool = False,
            state_path: str | Path | None = None,
            *,
            batch_size: int | None = None,
        ) -> Any:
            """Run the configured attacks; return ``x_adv``, or ``(x_adv, y_adv)`` with return_labels.

            ``batch_size`` is accepted as an alias of ``bs`` for pyautoattack-style callers.

            ``state_path`` makes the run resumable, and resuming actually works (pyautoattack
            0.2.0's own resume always fails: see :func:`robustbench_kd.zoo.autoattack_resume.
            run_resumable`, which runs it here). The file is then ours, not an ``EvaluationState``
            dump; ``autoattack.state.EvaluationState.from_disk`` (what ``benchmark`` reads) reads it.
            As in AutoAttack, after a resume only the adversarial examples found in this session
            are in ``x_adv`` (``y_adv`` covers all sessions).
            """
            size = bs if batch_size is None else batch_size
            if state_path is not None:
                run = run_resumable(
                    self, x_orig, y_orig, batch_size=size, state_path=state_path, backend=autoattack_version()
                )
                return (run.x_adv, run.y_adv) if return_labels else run.x_adv
            with _log_to_file(self.log_path):
                x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=size)
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(
            self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250, return_labels: bool = False
        ) -> dict[str, Any]:
            """Run each attack on its own; ``{attack: x_adv}`` (or ``(x_adv, y_adv)`` with return_labels)."""
            attacks, verbose = list(self.attacks_to_run), self.verbose
            self.logger.info("using %s version including %s", self.version, ", ".join(attacks))
            adv: dict[str, Any] = {}
            self.verbose = False
            try:
                for attack in attacks:
                    self.attacks_to_run = [attack]
                    x_adv, y_adv = self.run_standard_evaluation(x_orig, y_orig, bs=bs, return_labels=True)
                    adv[attack] = (x_adv, y_adv) if return_labels else x_adv
                    if verbose:
                        acc = self.clean_accuracy(x_adv, y_orig, bs=bs)
                        self.logger.debug("robust accuracy by %s: %.2f%%", attack.upper(), 100 * acc)
            finally:
                self.attacks_to_run, self.verbose = attacks, verbose
            return adv

        def clean_accuracy(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250) -> float:
            """Fraction of ``x_orig`` the model classifies as ``y_orig``."""
            with _log_to_file(self.log_path):
                return float(super().clean_accuracy(x_orig, y_orig, bs=bs))

    # Pickle and reprs then point at ``robustbench_kd.zoo.compat.AutoAttack``, which resolves back here.
    AutoAttack.__module__ = __name__
    AutoAttack.__qualname__ = "AutoAttack"
    return AutoAttack
