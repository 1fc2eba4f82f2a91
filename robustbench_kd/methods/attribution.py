"""Attribution-region (class activation map) alignment between a teacher and a student, in torch.

SmaraAD (Yin et al., CVPR 2024, Eqs. 6-7) makes the student attend to the same image regions as the
teacher by matching their class activation maps (CAM, Zhou et al. 2016)::

    CAM_M(x)[h, w] = sum_k W_M[c, k] * A_M(x)[k, h, w]                                   (Eq. 6)
    L_align(x)     = 1/(W H) sum_{i,j} ( G(N(CAM_T(x)))_ij - G(N(CAM_S(x)))_ij )^2        (Eq. 7)

A_M is model M's last feature map (the map that is globally average-pooled before the final
``nn.Linear``), W_M that Linear's weight, c the class the map explains, N a per-image normalisation
and G a bilinear resize that brings both maps to a common W x H. The paper points to
pytorch-grad-cam for the CAMs; that library returns numpy arrays and cannot be trained through, so
everything here is torch and keeps the autograd graph: gradients reach the student's parameters in the
outer loss and the *input* through both models inside the attack.

Choices the paper leaves open, as options of :class:`CamAlignment`:

* ``classes``: ``"label"`` -- c = the ground-truth y for both models (our choice, so both maps
  explain the same class) -- or ``"top"`` -- each model's own arg-max class (pytorch-grad-cam's
  default target).
* ``normalization`` N: ``"relu_minmax"`` -- ReLU, then per image ``(m - min) / (max - min + 1e-7)``
  (pytorch-grad-cam's CAM post-processing) --, ``"minmax"`` (no ReLU) or ``"none"`` (raw CAMs as in
  Eq. 6; teacher and student maps then live on unrelated scales). min and max are not detached.
* ``resize`` G: to the ``"input"`` size (pytorch-grad-cam), or to the ``"teacher"``'s or the
  ``"student"``'s map size. Bilinear, ``align_corners=False`` (the half-pixel convention of OpenCV's
  ``cv2.resize`` that pytorch-grad-cam uses). As in pytorch-grad-cam, N is applied at the map's own
  resolution and G afterwards (bilinear resizing keeps values in [0, 1]).

Feature maps and classifier weights are read with :class:`robustbench_kd.methods.features.FeatureTap`, which
works for the RobustBench WideResNet/DMWideResNet/ResNet/PreActResNet teachers and our students.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.methods.features import FeatureTap
from robustbench_kd.teachers import EnsembleTeacher

__all__ = [
    "CAM_CLASSES",
    "CAM_NORMALIZATIONS",
    "CAM_RESIZE",
    "CamAlignment",
    "alignment_loss",
    "logits_and_cam",
    "normalize_cam",
    "resize_cam",
]

#: Which class a CAM explains: the label y, or the model's own top class.
CAM_CLASSES = ("label", "top")
#: Per-image CAM normalisation before the MSE.
CAM_NORMALIZATIONS = ("relu_minmax", "minmax", "none")
#: The common size both CAMs are resized to.
CAM_RESIZE = ("input", "teacher", "student")

#: Denominator guard of the min-max scaling (pytorch-grad-cam's value).
MINMAX_EPS = 1e-7


def normalize_cam(cam: Tensor, mode: str = "relu_minmax", eps: float = MINMAX_EPS) -> Tensor:
    """Normalise each map of a (N, H, W) batch: ``relu_minmax`` / ``minmax`` to [0, 1], or ``none``.

    ``minmax`` maps ``m -> (m - min(m)) / (max(m) - min(m) + eps)`` per image; a constant map becomes
    all zeros. Differentiable (min and max included).
    """
    if mode not in CAM_NORMALIZATIONS:
        raise ValueError(f"CAM normalization must be one of {', '.join(CAM_NORMALIZATIONS)}, got {mode!r}")
    if cam.dim() != 3:
        raise ValueError(f"CAMs must have shape (N, H, W), got {tuple(cam.shape)}")
    if mode == "none":
        return cam
    if mode == "relu_minmax":
        cam = F.relu(cam)
    flat = cam.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    return (cam - low) / (high - low + eps)


def resize_cam(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``) of (N, H, W) maps to ``size``; identity if equal."""
    size = (int(size[0]), int(size[1]))
    if tuple(cam.shape[-2:]) == size:
        return cam
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def logits_and_cam(model: nn.Module, x: Tensor, classes: Tensor | None) -> tuple[Tensor, Tensor]:
    """One forward pass of ``model`` on ``x`` returning ``(logits, raw CAM (N, h, w))``.

    ``classes`` gives the class per sample (shape (N,)); ``None`` uses the model's own arg-max class
    on ``x``. The CAM is built from the tapped feature map and the final Linear's weight and keeps
    the graph (to the input, and to the parameters that require grad). A teacher ensemble of more
    than one network has no single CAM and is rejected.
    """
    if isinstance(model, EnsembleTeacher) and len(model.members) > 1:
        raise UserError(
            f"CAM alignment needs one teacher network, got an ensemble of {len(model.members)} "
            f"({model.spec}); configure a single teacher for this role"
        )
    with FeatureTap(model, penultimate=False, feature_map=True) as tap:
        logits = model(x)
    target = logits.argmax(dim=1) if classes is None else classes
    return logits, tap.cam(target)


def alignment_loss(
    cam_teacher: Tensor, cam_student: Tensor, *, size: tuple[int, int], normalization: str = "relu_minmax"
) -> Tensor:
    """Per-sample Eq. 7: mean over the W x H grid of ``(G(N(CAM_T)) - G(N(CAM_S)))^2``; shape (N,)."""
    if cam_teacher.shape[0] != cam_student.shape[0]:
        raise ValueError(f"CAM batch sizes differ: {cam_teacher.shape[0]} vs {cam_student.shape[0]}")
    t = resize_cam(normalize_cam(cam_teacher, normalization), size)
    s = resize_cam(normalize_cam(cam_student, normalization), size)
    return (t - s).pow(2).flatten(1).mean(dim=1)


@dataclass(frozen=True)
class CamAlignment:
    """The options of the alignment loss (see the module docstring) bundled with the two steps.

    Examples::

        align = CamAlignment(classes="label", normalization="relu_minmax", resize="input")
        zt, cam_t = align.forward(teacher, x, y)        # input-differentiable in an attack
        zs, cam_s = align.forward(student, x, y)
        per_sample = align.loss(cam_t, cam_s, x)        # (N,)
    """

    classes: str = "label"
    normalization: str = "relu_minmax"
    resize: str = "input"

    def __post_init__(self) -> None:
        if self.classes not in CAM_CLASSES:
            raise UserError(f"CAM class must be one of {', '.join(CAM_CLASSES)}, got {self.classes!r}")
        if self.normalization not in CAM_NORMALIZATIONS:
            raise UserError(
                f"CAM normalization must be one of {', '.join(CAM_NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if self.resize not in CAM_RESIZE:
            raise UserError(f"CAM resize must be one of {', '.join(CAM_RESIZE)}, got {self.resize!r}")

    def forward(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, raw CAM)`` of ``model`` on ``x`` for class y (``"label"``) or its top class."""
        return logits_and_cam(model, x, y if self.classes == "label" else None)

    def target_size(self, cam_teacher: Tensor, cam_student: Tensor, x: Tensor) -> tuple[int, int]:
        """The common size G resizes to."""
        if self.resize == "input":
            return int(x.shape[-2]), int(x.shape[-1])
        ref = cam_teacher if self.resize == "teacher" else cam_student
        return int(ref.shape[-2]), int(ref.shape[-1])

    def loss(self, cam_teacher: Tensor, cam_student: Tensor, x: Tensor) -> Tensor:
        """Per-sample L_align for raw CAMs of the teacher and the student on input batch ``x``."""
        return alignment_loss(
            cam_teacher,
            cam_student,
            size=self.target_size(cam_teacher, cam_student, x),
            normalization=self.normalization,
        )
