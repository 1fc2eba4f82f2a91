"""What the ``[speed]`` switches do to a training step: autocast, GradScaler, channels_last, torch.compile.

:class:`SpeedPlan` applies them to a run's student and teachers and gives the step's phases as named
methods; with every switch off each method is a plain call, so a step reads the same either way::

    plan = SpeedPlan(config.speed, device, student, teachers)
    x = plan.inputs(x)
    with plan.attack_precision():   ctx.x_adv = attack(x, y)      # fp32 unless attack_fp32 = false
    with plan.autocast():           out = distiller.loss(ctx)     # bf16/fp16 outer step
    plan.backward(out.total)                                      # scaled by the GradScaler for fp16
    plan.optimizer_step(optimizer)                                # the scaler's step and update for fp16

The trainer reaches these through :class:`robustbench_kd.training.engine.StepEngine`, which adds DDP and the
EMA copy.

Decisions, and why:

* Under ``amp`` the networks compute in bf16/fp16 but hand their logits out in fp32 (a forward hook on the
  student and on each teacher casts the output), so every method's softmax/KL/CE runs in fp32 whatever
  the device's autocast op lists say. CPU autocast keeps ``log_softmax`` and elementwise ops in bf16, and a
  temperature-scaled KL (ARD: tau = 30, times tau^2) computed there comes out wrong, even negative.
* Only the outer step runs under autocast. The attack is explicitly excluded (``attack_fp32``, default
  true): PGD follows ``sign(grad)`` of an input gradient, which in fp16 underflows to zero for many pixels
  without a loss scale, and the attack has no scaler.
* ``torch.compile`` of the student gives a separate *view* (``plan.student``, an ``OptimizedModule``
  sharing the parameters) that only the training loop calls. ``run.student`` stays the plain module, so
  checkpoints, EMA, exports and evaluation never see ``_orig_mod.`` keys or compiled forwards (compiling in
  place would also be unsafe under ``copy.deepcopy``: the compiled call stays bound to the original).
* Teachers are compiled in place (``nn.Module.compile``): their type (``Teacher``/``EnsembleTeacher``, which
  methods check), names (feature taps find layers by name), frozen parameters and eval mode are kept.
* With compile on, dynamo guards on module hooks (``skip_nnmodule_hook_guards = False``, process-wide), so
  feature taps registered after the first compiled call still run.
* ``channels_last`` converts the student and teachers in place and the batch on entry; the attack's
  tensors inherit the layout from the batch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, cast

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.scale.sections import SpeedSection
from robustbench_kd.teachers import TeacherSet

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SpeedPlan:
    """Applies ``[speed]`` to one run's student and teachers and wraps the step's phases.

    Args:
        section: the run's ``[speed]`` section.
        device: the training device (autocast and the scaler use its type).
        student: the plain student; converted to channels_last in place when asked.
        teachers: the run's teachers; converted/compiled in place when asked.
    """

    def __init__(self, section: SpeedSection, device: torch.device, student: nn.Module, teachers: TeacherSet) -> None:
        self.section = section
        self.device_type = torch.device(device).type
        self.amp_dtype = _DTYPES.get(section.amp)
        if self.amp_dtype is not None:
            check_autocast(self.device_type, self.amp_dtype, section.amp)
            for net in (student, *teachers.values()):
                net.register_forward_hook(_fp32_output)
        # bf16 has fp32's exponent range, so only fp16 needs loss scaling.
        self.scaler = torch.amp.GradScaler(self.device_type) if section.amp == "fp16" else None
        if section.channels_last:
            student.to(memory_format=torch.channels_last)
            for teacher in teachers.values():
                teacher.to(memory_format=torch.channels_last)
        if section.compile != "off":
            check_backend(section.compile_backend)
            # Dynamo ignores forward hooks added after a module was first compiled unless it guards on them;
            # feature taps (GACD, SmaraAD) add theirs per batch. Guarding makes such calls recompile (and fall
            # back to eager past the recompile limit) instead of silently skipping the hooks. Process-wide.
            import torch._dynamo as dynamo

            dynamo.config.skip_nnmodule_hook_guards = False
        #: what the training loop calls: the compiled view of the student, or the student itself
        self.student: nn.Module = student
        if section.compile in ("student", "both"):
            self.student = cast(nn.Module, torch.compile(student, backend=section.compile_backend))
        if section.compile in ("teachers", "both"):
            for teacher in teachers.values():
                teacher.compile(backend=section.compile_backend)

    # -- the step's phases ---------------------------------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        """The batch in the memory format the models use."""
        if self.section.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the outer step (the method's loss): autocast when ``amp`` is on."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def attack_precision(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the inner maximisation: autocast explicitly off with ``attack_fp32`` (even if a caller
        wrapped the whole step in autocast), the outer step's autocast otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        if self.section.attack_fp32:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    @property
    def scales_gradients(self) -> bool:
        """Whether the gradients after :meth:`backward` are multiplied by the fp16 loss scale."""
        return self.scaler is not None

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``; under fp16 the loss is multiplied by the GradScaler's scale first."""
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 the GradScaler's step (unscales, skips a step whose gradients
        overflowed) and its update of the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    # -- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any] | None:
        """The GradScaler's state (fp16), else None."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the GradScaler; a checkpoint from a run without fp16 leaves the fresh scaler."""
        if self.scaler is None:
            return
        if state:
            self.scaler.load_state_dict(state)
        else:
            log.warning(
                'resuming with speed.amp = "fp16" from a checkpoint without GradScaler state: the loss '
                "scale starts afresh"
            )


def _fp32_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: low-precision logits leave the network as fp32 (a no-op outside autocast)."""
    if isinstance(output, Tensor) and output.dtype in (torch.float16, torch.bfloat16):
        return output.float()
    return None


def check_autocast(device_type: str, dtype: torch.dtype, name: str) -> None:
    """A one-line UserError when this torch cannot autocast to ``dtype`` on ``device_type``."""
    try:
        with torch.autocast(device_type, dtype=dtype):
            a = torch.ones(2, 2, device=device_type)
            out = a @ a
    except Exception as exc:  # autocast raises or warns-and-disables depending on the torch version
        raise UserError(
            f"speed.amp = {name!r} is not supported on {device_type} by torch {torch.__version__} "
            f'({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); use "bf16" or '
            '"off"'
        ) from None
    if out.dtype != dtype:
        raise UserError(
            f"speed.amp = {name!r}: torch {torch.__version__} does not autocast to {dtype} on "
            f'{device_type}; use "bf16" or "off"'
        )


def check_backend(backend: str) -> None:
    """A one-line UserError naming the valid backends when ``backend`` is not a torch.compile backend."""
    import torch._dynamo  # the backend registry; imported only when compiling

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        common = sorted({*torch._dynamo.list_backends(), "eager", "aot_eager"})
        raise UserError(f"speed.compile_backend {backend!r} is not a torch.compile backend; valid: {', '.join(common)}")
