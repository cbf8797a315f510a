"""Detectors: torchvision's FCOS on an ImageNet MobileNetV2 with a feature pyramid.

A :class:`MedsightDetector` trains like a classifier in the medsight loop: it takes the
preprocessed ``(N, C, H, W)`` batch, in training mode with its targets as one fixed-shape tensor
``(N, M, 5)`` (``[x1, y1, x2, y2, class]`` normalised to ``[0, 1]``, padded rows class −1), and
returns torchvision's loss dict; in eval mode it returns a fixed-shape ``(N, D, 6)`` tensor of
detections ``[x1, y1, x2, y2, score, class]``, normalised, best first, padded with score 0 and
class −1. Fixed shapes let the trainer, the predictor, ONNX Runtime and the worklist carry
detections as they carry class probabilities.

Why FCOS on MobileNetV2: it is anchor-free (no anchor sizes to tune to each modality's lesion
sizes), torchvision ships it, and MobileNetV2's ImageNet weights install offline
(``requirements-weights.txt``). The pyramid is taken at strides 8, 16 and 32 (with P6/P7 from
P5), so lesions of 8–128 px at the input size each have a level. The backbone's BatchNorm is
frozen, as torchvision does for detection: batches of a few images make poor statistics.

>>> model = create_detector("fcos_mobilenet_v2", ["lesion"], pretrained=False)
>>> model.eval()(torch.zeros(2, 3, 128, 128)).shape
torch.Size([2, 100, 6])
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from medsight.errors import ConfigError
from medsight.models.transfer import grouped_parameters

#: Detections kept per image (the width of the output).
MAX_DETECTIONS = 100
#: Boxes scoring below this are dropped before NMS: low enough that FROC reaches 8 false
#: positives per image.
SCORE_THRESHOLD = 0.02
#: The pyramid's channels (torchvision's 256 is sized for 800 px COCO images on GPUs).
FPN_CHANNELS = 64

#: MobileNetV2's feature blocks by stride: the stages freezing and learning rates go by.
_MOBILENET_STAGES = (
    ("stem", range(0, 2)),
    ("stride4", range(2, 4)),
    ("stride8", range(4, 7)),
    ("stride16", range(7, 14)),
    ("stride32", range(14, 18)),
)
#: Blocks whose outputs feed the pyramid (strides 8, 16, 32) and their channels.
_RETURNED = {"6": "0", "13": "1", "17": "2"}
_RETURNED_CHANNELS = [32, 96, 320]

DETECTORS = {
    "fcos_mobilenet_v2": "FCOS (anchor-free) on MobileNetV2 + FPN, ImageNet weights offline",
}


def create_detector(
    name: str,
    classes: list[str] | int,
    *,
    in_chans: int = 3,
    pretrained: bool = True,
    image_size: int = 256,
) -> MedsightDetector:
    """A detector for ``classes`` (names or their number), by name (:data:`DETECTORS`)."""
    if name not in DETECTORS:
        raise ConfigError(f"--model {name!r} is not a detector; detectors: {', '.join(DETECTORS)}")
    num_classes = classes if isinstance(classes, int) else len(classes)
    if num_classes < 1:
        raise ConfigError("a detector needs at least one box class")
    features, source = _mobilenet_features(in_chans, pretrained)
    return MedsightDetector(
        name,
        features,
        num_classes,
        in_chans=in_chans,
        image_size=image_size,
        pretrained_source=source,
    )


def detector_from_config(config: dict[str, Any]) -> MedsightDetector:
    """The architecture ``model.json`` describes, with random weights (loaded after)."""
    features, _ = _mobilenet_features(int(config["in_chans"]), pretrained=False)
    size = config.get("image_size") or config["default_size"]
    return MedsightDetector(
        config["name"],
        features,
        int(config["num_classes"]),
        in_chans=int(config["in_chans"]),
        image_size=int(max(size) if isinstance(size, list) else size),  # model.json: [h, w]
    )


def is_detector_config(config: dict[str, Any]) -> bool:
    """Whether a ``model.json`` describes a detector."""
    return isinstance(config, dict) and config.get("name") in DETECTORS


def load_detector_weights(model: MedsightDetector, weights: str | Path) -> str:
    """Start ``model`` from an earlier detection run (its folder) or a state-dict file: every
    tensor whose name and shape match is loaded (a run with other classes gives all but the
    class logits); a file that fits nothing is refused."""
    from medsight.models.weights import read_state_dict

    path = Path(weights).expanduser()
    file = path / "model.safetensors" if path.is_dir() else path  # a run's weights
    if not file.is_file():
        raise ConfigError(f"--weights {path}: no such file (or run folder with model.safetensors)")
    state = read_state_dict(file)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ConfigError(
            f"--weights {path}: none of its tensors fit {model.name}; give a detection run's "
            "folder or a state dict of the same detector"
        )
    model.load_state_dict(fitting, strict=False)
    model.pretrained_source = f"{'run' if path.is_dir() else 'file'}:{path}"
    return model.pretrained_source


def _mobilenet_features(in_chans: int, pretrained: bool) -> tuple[nn.Sequential, str | None]:
    from medsight.models.zoo import _build_torchvision, get_spec

    built = _build_torchvision(get_spec("mobilenet_v2"), in_chans, pretrained)
    features = built.backbone.features
    if built.state is not None:
        state = {k.removeprefix("features."): v for k, v in built.state.items()}
        state = {k: v for k, v in state.items() if k in features.state_dict()}
        if in_chans != 3:
            state.pop("0.0.weight", None)  # a new first conv for other channel counts
        features.load_state_dict(state, strict=False)
    return _freeze_batchnorm(features), built.source


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d → torchvision's FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


class MedsightDetector(nn.Module):
    """FCOS on a MobileNetV2 feature pyramid, with fixed-shape inputs and outputs (see the
    module docstring). Built by :func:`create_detector`."""

    def __init__(
        self,
        name: str,
        features: nn.Sequential,
        num_classes: int,
        *,
        in_chans: int,
        image_size: int,
        pretrained_source: str | None = None,
    ):
        super().__init__()
        self.name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.pretrained_source = pretrained_source
        backbone = BackboneWithFPN(
            features,
            return_layers=_RETURNED,
            in_channels_list=_RETURNED_CHANNELS,
            out_channels=FPN_CHANNELS,
            extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS),
        )
        # The images arrive resized and normalised by the run's Preprocess: torchvision's own
        # transform is made a no-op (same size, mean 0, std 1).
        self.net = FCOS(
            backbone,
            num_classes,
            min_size=image_size,
            max_size=image_size,
            image_mean=[0.0] * in_chans,
            image_std=[1.0] * in_chans,
            head=FCOSHead(FPN_CHANNELS, 1, num_classes, num_convs=2),
            score_thresh=SCORE_THRESHOLD,
            detections_per_img=MAX_DETECTIONS,
        )
        self._frozen = 0

    # forward ----------------------------------------------------------------------------

    def forward(self, x: Tensor, targets: Tensor | None = None):
        """Training: the loss dict of ``targets`` ``(N, M, 5)``; eval: ``(N, D, 6)``."""
        height, width = x.shape[-2:]
        scale = x.new_tensor([width, height, width, height])
        if self.training:
            if targets is None:
                raise ValueError("a detector in training mode needs its targets")
            return self.net(list(x), _target_dicts(targets, scale))
        detections = self.net(list(x))
        out = x.new_zeros((len(detections), MAX_DETECTIONS, 6))
        out[:, :, 5] = -1
        for i, found in enumerate(detections):
            k = min(len(found["scores"]), MAX_DETECTIONS)
            out[i, :k, :4] = (found["boxes"][:k] / scale).clamp(0, 1)
            out[i, :k, 4] = found["scores"][:k]
            out[i, :k, 5] = found["labels"][:k].to(out.dtype)
        return out

    # stages, freezing and parameter groups (as MedsightClassifier) ------------------------

    def _features(self) -> nn.Module:
        return self.net.backbone.body

    def stage_names(self) -> list[str]:
        return [name for name, _ in _MOBILENET_STAGES]

    def freeze_stages(self, k: int) -> None:
        """Freeze the first ``k`` backbone stages (their BatchNorm is always frozen)."""
        n = len(_MOBILENET_STAGES)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ConfigError(
                f"freeze_stages: k={k!r} is out of range; choose 0 to {n} "
                f"(stages: {', '.join(self.stage_names())})"
            )
        frozen = {str(i) for _, blocks in _MOBILENET_STAGES[:k] for i in blocks}
        for name, param in self._features().named_parameters():
            param.requires_grad_(name.split(".")[0] not in frozen)
        self._frozen = k

    def frozen_stages(self) -> int:
        return self._frozen

    def param_groups(
        self, lr: float, backbone_lr: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """The pretrained backbone at ``backbone_lr``; pyramid and heads at ``lr``; no weight
        decay on biases and norm weights."""
        return grouped_parameters(
            self, lambda name: name.startswith("net.backbone.body."), lr, backbone_lr, weight_decay
        )

    def config(self) -> dict[str, Any]:
        """What ``model.json`` holds (:func:`detector_from_config` rebuilds it)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "default_size": self.image_size,
            "attention": "none",
        }


def _target_dicts(targets: Tensor, scale: Tensor) -> list[dict[str, Tensor]]:
    """``(N, M, 5)`` padded, normalised targets → torchvision's per-image dicts in pixels."""
    dicts = []
    for rows in targets:
        real = rows[:, 4] >= 0
        dicts.append(
            OrderedDict(boxes=rows[real, :4] * scale, labels=rows[real, 4].to(torch.int64))
        )
    return dicts
