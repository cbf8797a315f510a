"""The classifier every medsight model is (backbone → attention → head) and its transfer tools.

:class:`MedsightClassifier` wraps any feature extractor that has ``forward_features`` (a timm
CNN, torchvision's MobileNetV2 features, a custom CNN). Its backbone is split into *stages*
(stem first) found once, at construction, by tracing one small forward pass: which modules run
before each reduction stage of the backbone ends. Freezing the first k stages, per-group
learning rates and the Grad-CAM layer all read that split instead of guessing per architecture.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from medsight.errors import ConfigError

if TYPE_CHECKING:
    from medsight.models.spec import ModelSpec

__all__ = ["ClassifierHead", "MedsightClassifier", "Stage", "StagePlan", "plan_stages"]

CONFIG_KEYS = (
    "name", "num_classes", "in_chans", "attention", "pool", "drop_rate", "default_size",
)  # fmt: skip


class ClassifierHead(nn.Module):
    """Pool → dropout → ``Linear(num_features, num_classes)``.

    ``pool``: global average pooling (``None``, the default) or a module mapping the map
    (B, C, h, w) to (B, C, …), e.g. :class:`~medsight.models.attention.AttentionPool2d`.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        drop_rate: float = 0.0,
        pool: nn.Module | None = None,
        dims: int = 2,
    ):
        super().__init__()
        if pool is None:
            pool = nn.AdaptiveAvgPool3d(1) if dims == 3 else nn.AdaptiveAvgPool2d(1)
        self.pool = pool
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, fmap: Tensor) -> Tensor:
        return self.fc(self.drop(self.pool(fmap).flatten(1)))


# --- tracing the backbone: stages, unused modules, Grad-CAM layer ----------------------------


@dataclass(frozen=True)
class Stage:
    """One freezable part of the backbone: its name and the (backbone-relative) parameter names."""

    name: str
    params: tuple[str, ...]


@dataclass
class StagePlan:
    """What one traced forward pass of a backbone teaches about it."""

    stages: list[Stage]
    cam_module: str
    num_features: int
    removed: list[str] = field(default_factory=list)  # unused top-level modules, dropped


@dataclass
class _Trace:
    pre: dict[str, int]  # module name → position of its first call
    post: dict[str, int]  # module name → position of its first return
    outputs: list[tuple[str, Tensor]]  # (module name, output) in the order they returned
    final: Tensor


def _trace(backbone: nn.Module, in_chans: int, size: int, dims: int = 2) -> _Trace:
    pre: dict[str, int] = {}
    post: dict[str, int] = {}
    outputs: list[tuple[str, Tensor]] = []
    counter = [0]

    def on_pre(name: str) -> Callable:
        def hook(module, args):
            counter[0] += 1
            pre.setdefault(name, counter[0])

        return hook

    def on_post(name: str) -> Callable:
        def hook(module, args, out):
            counter[0] += 1
            post.setdefault(name, counter[0])
            if isinstance(out, Tensor):
                outputs.append((name, out))

        return hook

    handles = []
    for name, module in backbone.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(on_pre(name)))
            handles.append(module.register_forward_hook(on_post(name)))
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            shape = (1, in_chans, *(size,) * dims)
            final = backbone.forward_features(torch.zeros(shape, device=device))
    finally:
        backbone.train(was_training)
        for handle in handles:
            handle.remove()
    return _Trace(pre, post, outputs, final)


def _owners(backbone: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in registration order."""
    return [
        name
        for name, module in backbone.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _remove_unused_top_level(backbone: nn.Module, trace: _Trace) -> list[str]:
    # Head-side parts a timm model keeps for its own classifier (VGG's pre_logits, MobileNetV3's
    # conv_head) never run in forward_features; they would sit frozen-or-not yet untrained.
    removed = []
    for name, child in list(backbone.named_children()):
        has_params = any(True for _ in child.parameters())
        if has_params and name not in trace.pre:
            setattr(backbone, name, nn.Identity())
            removed.append(name)
    return removed


def resolution_boundaries(trace: _Trace, container: str) -> list[str]:
    """The last child of ``container`` at each output resolution (torchvision-style Sequentials)."""
    depth = container.count(".") + 1 if container else 0
    children = [
        (name, out.shape[2:])
        for name, out in trace.outputs
        if out.dim() == trace.final.dim()
        and (_under(name, container) if container else True)
        and name.count(".") == depth
        and name != container
    ]
    boundaries = []
    for i, (name, shape) in enumerate(children):
        if i + 1 == len(children) or children[i + 1][1] != shape:
            boundaries.append(name)
    return boundaries


def _compress(parts: list[str]) -> list[str]:
    # ["blocks.3", "blocks.4"] → ["blocks.3-4"]; ["block4", …, "block11"] → ["block4-11"];
    # VGG's ["features.5", "features.7"] (a ReLU between) → ["features.5-7"]
    out: list[tuple[str, int, int] | str] = []
    for part in parts:
        m = re.fullmatch(r"(.*?)(\d+)", part)
        if m and out and isinstance(out[-1], tuple):
            prefix, first, last = out[-1]
            # Same parent, later index: siblings in between ran in this stage or own nothing.
            if prefix == m.group(1) and int(m.group(2)) > last:
                out[-1] = (prefix, first, int(m.group(2)))
                continue
        out.append((m.group(1), int(m.group(2)), int(m.group(2))) if m else part)
    names = []
    for item in out:
        if isinstance(item, tuple):
            prefix, first, last = item
            names.append(f"{prefix}{first}" if first == last else f"{prefix}{first}-{last}")
        else:
            names.append(item)
    return names


def _stage_name(members: list[str], owners: list[str]) -> str:
    """Name a stage by the largest modules it holds whole, e.g. ``layer1`` or ``blocks.3-4``."""
    member_set = set(members)
    tops: list[str] = []
    for name in members:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if all(o in member_set for o in owners if _under(o, prefix)):
                if prefix not in tops:
                    tops.append(prefix)
                break
    parts = _compress(tops)
    return "+".join(parts) if len(parts) <= 3 else f"{parts[0]}..{parts[-1]}"


def plan_stages(
    backbone: nn.Module,
    in_chans: int,
    boundaries: Callable[[_Trace], Sequence[str]],
    size: int = 96,
    dims: int = 2,
) -> StagePlan:
    """Trace ``backbone.forward_features`` once and split the backbone into stages.

    ``boundaries(trace)`` names the module that *ends* each stage, stem first (timm's
    ``feature_info`` modules, or the last block at each resolution). A parameter belongs to the
    stage during which its module first runs; parameters that run after the last boundary join
    the last stage; stages with no parameters are dropped. Top-level modules that never run
    (a timm model's own pre-logits) are replaced by ``nn.Identity`` and listed in ``removed``.
    """
    trace = _trace(backbone, in_chans, size, dims)
    if trace.final.dim() != 2 + dims:
        layout = "(B, C, X, Y, Z)" if dims == 3 else "(B, C, H, W)"
        raise ConfigError(
            f"{type(backbone).__name__} gives features of shape {tuple(trace.final.shape)}, not a"
            f" {layout} map; medsight's head and attention need a CNN backbone"
        )
    removed = _remove_unused_top_level(backbone, trace)
    ends = sorted(trace.post[b] for b in dict.fromkeys(boundaries(trace)) if b in trace.post)
    owners = _owners(backbone)
    n_stages = max(len(ends), 1)
    members: list[list[str]] = [[] for _ in range(n_stages)]
    previous = 0
    for owner in owners:
        if owner in trace.pre:
            index = min(sum(end < trace.pre[owner] for end in ends), n_stages - 1)
        else:
            index = previous  # never ran (deep inside): keep it with its neighbours
        members[index].append(owner)
        previous = index
    stages = []
    for index, group in enumerate(m for m in members if m):
        ordered = sorted(group, key=lambda o: trace.pre.get(o, 0))
        name = "stem" if index == 0 else _stage_name(ordered, owners)
        params = tuple(
            f"{owner}.{p}" if owner else p
            for owner in group
            for p, _ in backbone.get_submodule(owner).named_parameters(recurse=False)
        )
        stages.append(Stage(name, params))
    final = trace.final
    cam = [name for name, out in trace.outputs if out is final]
    if not cam:
        cam = [name for name, out in trace.outputs if out.shape == final.shape]
    cam_module = cam[-1] if cam else owners[-1]
    return StagePlan(stages, cam_module, int(final.shape[1]), removed)


# --- the classifier ----------------------------------------------------------------------


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


class MedsightClassifier(nn.Module):
    """backbone → attention → head (pool → dropout → linear); built by :func:`create_model`.

    Attributes: ``spec`` (:class:`~medsight.models.spec.ModelSpec`), ``num_classes``,
    ``in_chans``, ``attention_kind``, ``pool_kind`` (``"avg"``, or ``"attention"`` for the
    head's :class:`~medsight.models.attention.AttentionPool2d`), ``drop_rate``,
    ``num_features``, ``pretrained_source``
    (``"package:<dist>"``, ``"file:<path>"``, ``"run:<dir>"``, ``"timm-cache:<file>"``,
    ``"hub:<id>"``, or ``None`` for random initialisation).

    Example:
        >>> model = create_model("resnet18", num_classes=2, in_chans=1)
        >>> model.stage_names()
        ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
        >>> model.freeze_stages(3)        # stem, layer1, layer2 frozen (BatchNorm kept in eval)
    """

    def __init__(
        self,
        spec: ModelSpec,
        backbone: nn.Module,
        plan: StagePlan,
        num_classes: int,
        *,
        in_chans: int,
        attention: nn.Module,
        attention_kind: str,
        drop_rate: float = 0.0,
        pretrained_source: str | None = None,
        pool: nn.Module | None = None,
    ):
        super().__init__()
        #: 2: images ``(B, C, H, W)``; 3: volumes ``(B, C, X, Y, Z)`` (the spec's).
        self.dims = getattr(spec, "dims", 2)
        self.spec = spec
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.attention_kind = attention_kind
        self.drop_rate = drop_rate
        self.num_features = plan.num_features
        self.pretrained_source = pretrained_source
        self.backbone = backbone
        self.attention = attention
        self.pool_kind = "avg" if pool is None else "attention"
        self.head = ClassifierHead(plan.num_features, num_classes, drop_rate, pool, self.dims)
        self._stages = plan.stages
        self._cam_module = plan.cam_module
        self._removed = list(plan.removed)
        self._frozen = 0
        self._frozen_norms: list[nn.Module] = []

    # forward ----------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's feature map (B, C, h, w), before ``self.attention``."""
        return self.backbone.forward_features(x)

    def forward_head(self, fmap: Tensor) -> Tensor:
        """Attention → pool → dropout → linear: logits (B, num_classes)."""
        return self.head(self.attention(fmap))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # stages and freezing ----------------------------------------------------------------

    def stage_names(self) -> list[str]:
        """The backbone's stages in order, stem first."""
        return [stage.name for stage in self._stages]

    def stage_outputs(self) -> list[str | None]:
        """Backbone-relative name of the module whose output ends each stage (a CAM target),
        or None where no single module does: the stage name's last part, a block range
        ``features.7-13`` read as its last block ``features.13``."""
        modules = dict(self.backbone.named_modules())
        outputs: list[str | None] = []
        for name in self.stage_names():
            last = re.split(r"\+|\.\.", name)[-1]
            last = re.sub(r"\.(\d+)-(\d+)$", r".\2", last)
            outputs.append(last if last in modules else None)
        return outputs

    def stage_parameters(self, index: int) -> list[str]:
        """Backbone-relative names of the parameters in stage ``index``."""
        return list(self._stages[index].params)

    def freeze_stages(self, k: int) -> None:
        """Freeze the first ``k`` stages (0: none; ``len(stage_names())``: the whole backbone).

        Their parameters stop requiring gradients and their BatchNorm layers stay in eval mode
        (running statistics fixed) even after ``model.train()``. Calling it again with a
        smaller ``k`` unfreezes the later stages.
        """
        n = len(self._stages)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ConfigError(
                f"freeze_stages: k={k!r} is out of range; choose 0 to {n} "
                f"(stages: {', '.join(self.stage_names())})"
            )
        frozen = {p for stage in self._stages[:k] for p in stage.params}
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name not in frozen)
        owners = {p.rpartition(".")[0] for p in frozen}
        self._frozen_norms = [
            m for name, m in self.backbone.named_modules() if name in owners and _is_norm(m)
        ]
        self._frozen = k
        self.train(self.training)

    def frozen_stages(self) -> int:
        """How many stages :meth:`freeze_stages` froze."""
        return self._frozen

    def train(self, mode: bool = True) -> MedsightClassifier:
        super().train(mode)
        for module in self._frozen_norms:
            module.eval()
        return self

    def param_groups(
        self, lr: float, backbone_lr: float, weight_decay: float = 0.0
    ) -> list[dict[str, Any]]:
        """Optimizer parameter groups of the trainable parameters.

        The backbone's at ``backbone_lr``, the attention block's and head's at ``lr``; biases,
        norm weights and other 1-d parameters get no weight decay. Empty groups are left out;
        each group has a ``"name"`` key.

        Example:
            >>> torch.optim.AdamW(model.param_groups(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05))
        """
        return grouped_parameters(
            self, lambda name: name.startswith("backbone."), lr, backbone_lr, weight_decay
        )

    # explanation --------------------------------------------------------------------------

    def cam_layer(self) -> nn.Module:
        """The module whose output Grad-CAM should use.

        The attention block when there is one on the backbone, else the backbone's last conv
        stage (for custom CNNs, whose attention sits inside, the last stage including it).
        """
        if not isinstance(self.attention, nn.Identity):
            return self.attention
        return self.backbone.get_submodule(self._cam_module)

    def cam_layer_name(self) -> str:
        """Qualified name of :meth:`cam_layer` in this model (e.g. ``backbone.layer4``)."""
        if not isinstance(self.attention, nn.Identity):
            return "attention"
        return f"backbone.{self._cam_module}"

    # configuration ------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What ``model.json`` holds: enough to rebuild the architecture
        (:func:`~medsight.models.zoo.classifier_from_config`); ``dims`` 3 for volume models
        (absent: 2)."""
        extra = {"dims": 3} if self.dims == 3 else {}
        return {
            **extra,
            "name": self.spec.name,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "attention": self.attention_kind,
            "pool": self.pool_kind,
            "drop_rate": self.drop_rate,
            "default_size": self.spec.default_size,
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.spec.name!r}, num_classes={self.num_classes}, in_chans={self.in_chans},"
            f" attention={self.attention_kind!r}, pool={self.pool_kind!r},"
            f" frozen_stages={self._frozen}"
        )


def grouped_parameters(
    model: nn.Module,
    in_backbone: Callable[[str], bool],
    lr: float,
    backbone_lr: float,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer groups of ``model``'s trainable parameters: those ``in_backbone`` (by name) at
    ``backbone_lr``, the rest at ``lr``; biases, norm weights and other 1-d parameters without
    weight decay. Empty groups are left out; each group has a ``"name"``."""
    buckets: dict[str, list[nn.Parameter]] = {
        "backbone": [],
        "backbone_no_decay": [],
        "head": [],
        "head_no_decay": [],
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if in_backbone(name) else "head"
        buckets[part + ("_no_decay" if _no_decay(name, param) else "")].append(param)
    return [
        {
            "name": key,
            "params": params,
            "lr": backbone_lr if key.startswith("backbone") else lr,
            "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
        }
        for key, params in buckets.items()
        if params
    ]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)
