"""Built-in teacher sources: ``robustbench:<dataset>/<threat>/<Name>`` and ``file:PATH``.

* ``robustbench:cifar10/Linf/Carmon2019Unlabeled`` loads a RobustBench model-zoo entry from the run's
  ``zoo.model_dir`` (``<model_dir>/cifar10/Linf/Carmon2019Unlabeled.pt``). A missing file is an error
  naming that path before any network access, unless ``zoo.allow_download`` is set. ImageNet entries
  come as RobustBench builds them (normalisation inside the model, [0,1] inputs); when the run's images
  are not the size the entry was evaluated at (``Crop288`` entries: 288; timm's input size), the
  teacher resizes its inputs to that size first.
* ``file:runs/x/checkpoints/epoch_020.pt`` loads one of our checkpoints (its architecture is stored in
  it) or any state dict with ``?arch=<student arch>`` (plus arch options, e.g. ``&width=2``).

Both read files with ``torch.load(weights_only=True)`` only, and both accept ``?sha256=<hex>`` (for a
multi-file zoo ensemble one digest per member file, comma-separated): the file's digest is checked
before it is unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path

from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.storage.checkpoint import load_checkpoint, load_weights, state_dict_of
from robustbench_kd.teachers import ResizeInput, TeacherLoadContext, TeacherSpec, file_architecture

log = logging.getLogger(__name__)


def load_robustbench_teacher(spec: TeacherSpec, ctx: TeacherLoadContext):
    from robustbench_kd.zoo.models import load_zoo_model, parse_zoo_ref, zoo_input_size

    spec.check_options(())  # a zoo entry is named in full by its ref: an option here would be ignored
    dataset, threat_model, name = parse_zoo_ref(spec.ref)
    net = load_zoo_model(
        name,
        dataset=dataset,
        threat_model=threat_model,
        model_dir=ctx.model_dir,
        allow_download=ctx.allow_download,
        sha256=spec.sha256,
    )
    size = zoo_input_size(name, dataset=dataset, threat_model=threat_model)
    if size is not None and size != ctx.image_size:
        log.info(
            "teacher %s was evaluated on %dx%d inputs; resizing the run's %dx%d images for it",
            spec.text or spec.ref,
            size,
            size,
            ctx.image_size,
            ctx.image_size,
        )
        net = ResizeInput(net, size)
    return net


def build_network_from_file(
    path: Path,
    options: dict[str, str],
    *,
    students,
    num_classes: int,
    in_channels: int,
    image_size: int,
    sha256: str | None = None,
):
    """Rebuild a network from a checkpoint file (ours, zoo layout, or a bare state dict + ``arch``).

    ``sha256``: the pinned digest, checked before the file is unpickled.
    """
    data = load_checkpoint(path, sha256=sha256)
    arch, arch_options = file_architecture(data, options)
    if not arch:
        raise UserError(
            f"checkpoint {path} does not record its architecture; add ?arch=NAME to the spec "
            f"(valid: {', '.join(students.names())})"
        )
    factory = students.get(arch)
    net = factory(
        num_classes=int(data.get("num_classes", num_classes)),
        in_channels=int(data.get("in_channels", in_channels)),
        image_size=int(data.get("image_size", image_size)),
        **arch_options,
    )
    return load_weights(net, state_dict_of(data), source=f"checkpoint {path}")


@hookimpl
def rbkd_register_teacher_sources(registry):
    registry.add(
        "robustbench",
        load_robustbench_teacher,
        description="RobustBench model zoo: robustbench:<dataset>/<threat>/<Name>",
    )
    registry.add("file", load_file_teacher, description="local checkpoint: file:PATH[?arch=NAME&opt=value]")


def load_file_teacher(spec: TeacherSpec, ctx: TeacherLoadContext):
    if len(spec.sha256) > 1:
        raise UserError(f"teacher spec {spec.text!r} pins {len(spec.sha256)} sha256 digests for one file; give one")
    return build_network_from_file(
        Path(spec.ref).expanduser(),
        spec.options,
        students=ctx.students,
        num_classes=ctx.num_classes,
        in_channels=ctx.in_channels,
        image_size=ctx.image_size,
        sha256=spec.sha256[0] if spec.sha256 else None,
    )


# Both sources check ``?sha256=`` pins themselves (builders.load_teacher refuses a pin for sources without this).
load_robustbench_teacher.__dict__["verifies_sha256"] = True
load_file_teacher.__dict__["verifies_sha256"] = True
