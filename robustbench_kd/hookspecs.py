"""Hook specifications of the ``robustbench_kd`` plugin system (pluggy project ``robustbench_kd``).

A plugin is any module or object with functions marked ``@robustbench_kd.hookimpl`` whose names are
the hooks below. Built-in plugins live in ``robustbench_kd_plugins``; third-party plugins are found
through the entry-point group ``robustbench_kd``::

    [project.entry-points.robustbench_kd]
    mymethod = "rbkd_mymethod"

Implementations may accept any subset of a hook's arguments (one the hook does not pass is refused
when the plugin is loaded, naming the valid ones). Registrar hooks are called once per plugin with a
registrar bound to that plugin, so every registered name knows which plugin (and distribution) added
it, and a name registered twice is an error naming both plugins. Registrar hooks return nothing (a
returned value is an error: it would register nothing); what they register is checked as it is
registered, and what a registered factory returns is checked when it is called
(:mod:`robustbench_kd.registry`).

A plugin that cannot be loaded (it raises or calls ``sys.exit`` at import, its entry point names an
object without hooks, a registration of the wrong kind) is a one-line error naming it, exit 2; a plugin
whose code fails during a command (an exception, ``sys.exit``, a factory returning the wrong type) is
a one-line error naming it, exit 1 (``--debug`` shows the traceback).

Set ``RBKD_DISABLE_PLUGINS=name1,name2`` to block plugins by name and
``RBKD_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point discovery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from robustbench_kd.attacks import AttackLoss
    from robustbench_kd.context import BatchContext
    from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput
    from robustbench_kd.registry import Registrar

hookspec = pluggy.HookspecMarker("robustbench_kd")
hookimpl = pluggy.HookimplMarker("robustbench_kd")


# -- registrars ----------------------------------------------------------------------------------
@hookspec
def rbkd_register_methods(registry: Registrar) -> None:
    """Register distillation methods.

    Call ``registry.add(DistillerSubclass)`` for each method; the key is the class's ``name``.

    :param registry: registrar bound to the calling plugin.

    Called once per host, the first time methods are needed.
    """


@hookspec
def rbkd_register_teacher_sources(registry: Registrar) -> None:
    """Register teacher spec schemes (the ``scheme`` of ``scheme:ref`` teacher strings).

    Call ``registry.add(scheme, loader, description=...)`` where
    ``loader(spec: TeacherSpec, ctx: TeacherLoadContext) -> nn.Module`` returns a network taking
    [0,1] inputs and returning logits. Built-in schemes: ``robustbench`` and ``file``.

    :param registry: registrar bound to the calling plugin.
    """


@hookspec
def rbkd_register_students(registry: Registrar) -> None:
    """Register student architectures.

    Call ``registry.add(name, factory, description=...)`` where
    ``factory(*, num_classes, in_channels, image_size, **options) -> nn.Module``.

    :param registry: registrar bound to the calling plugin.
    """


@hookspec
def rbkd_register_datasets(registry: Registrar) -> None:
    """Register datasets.

    Call ``registry.add(name, loader, description=...)`` where ``loader(config: DataConfig) ->
    DataSplits`` returns the train and test tensors (uint8 or float images, int64 labels).

    :param registry: registrar bound to the calling plugin.
    """


# -- strategy ------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def rbkd_make_attack(distiller: Distiller, student: nn.Module, spec: AttackSpec, loss_fn: AttackLoss) -> Any:
    """Build the inner maximiser for an attack spec.

    Return a callable ``attack(x, y) -> x_adv`` (a ``torchattacks.Attack``) or None to let the next
    implementation decide. The trainer calls this once per epoch for each distinct ``spec`` and
    reuses the attack for every batch with that spec; ``loss_fn`` evaluates the batch being attacked
    and is bound to it only while ``attack(x, y)`` runs, so call it inside ``attack`` (calling it here,
    while building, raises). The built-in
    (``trylast``) returns :class:`robustbench_kd.attacks.DistillationAttack`. A plugin can substitute APGD, FGSM with
    random start, or an early-stopped PGD for some methods.

    :param distiller: the method being trained.
    :param student: the student network.
    :param spec: the method's attack budget and modes.
    :param loss_fn: ``x_adv -> per-sample loss`` of the current batch, to maximise.
    :return: the first non-None result is used.
    """


# -- observers (return values ignored) -----------------------------------------------------------
@hookspec
def rbkd_train_start(run: Any) -> None:
    """Called once before the first epoch (also after a resume).

    :param run: the :class:`robustbench_kd.training.setup.Run` (config, student, distiller, out_dir, ...).
    """


@hookspec
def rbkd_epoch_start(run: Any, epoch: int) -> None:
    """Called at the start of every epoch (0-based ``epoch``)."""


@hookspec
def rbkd_step_end(run: Any, ctx: BatchContext, out: LossOutput) -> None:
    """Called after every optimiser step, with the batch context and the loss terms.

    Keep it cheap: it runs in the hot loop. Avoid ``.item()`` on every step.
    """


@hookspec
def rbkd_epoch_end(run: Any, epoch: int, metrics: dict[str, float]) -> None:
    """Called after every epoch with that epoch's metrics (the row written to metrics.jsonl).

    Implementations may add keys to ``metrics``; they are written to the log.
    """


@hookspec
def rbkd_train_end(run: Any, metrics: dict[str, Any]) -> None:
    """Called once after the last epoch with the final metrics."""


@hookspec
def rbkd_model_info(info: dict[str, Any], run: Any) -> None:
    """Edit the RobustBench ``model_info`` dict in place before it is written.

    :param info: the leaderboard JSON content (keys as in RobustBench's model_info files).
    :param run: the run it belongs to, or None for ``robustbench-kd evaluate``.
    """
