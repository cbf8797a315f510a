"""Several trained classifiers as one network: the weighted mean of their calibrated probabilities.

:class:`EnsembleClassifier` is an ordinary ``nn.Module``, so an ensemble run is served,
exported to ONNX and explained like any other. Its output is the *log* of the averaged
probabilities: a softmax of it gives the average back exactly, which keeps every consumer of
logits (prediction, calibration, export parity) unchanged.

Members may have been trained on different inputs (gray or colour, ImageNet or 0.5
normalisation, another side): each member gets the ensemble's input converted to its own —
de-normalised, channels matched, resized, re-normalised — inside the module.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsight.errors import ConfigError
from medsight.models.zoo import classifier_from_config

_LUMA = (0.299, 0.587, 0.114)


class _InputAdapter(nn.Module):
    """The ensemble's normalised input → one member's normalised input."""

    def __init__(self, source: dict, target: dict):
        super().__init__()
        self.source_channels, self.target_channels = source["channels"], target["channels"]
        self.size = tuple(target["size"])
        self.resize = tuple(source["size"]) != self.size
        for name, prep in (("source", source), ("target", target)):
            channels = prep["channels"]
            mean = _per_channel(prep["mean"], channels)
            std = _per_channel(prep["std"], channels)
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1))
        self.identity = (
            not self.resize
            and self.source_channels == self.target_channels
            and torch.equal(self.source_mean, self.target_mean)
            and torch.equal(self.source_std, self.target_std)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        x = x * self.source_std + self.source_mean  # back to [0, 1] pixels
        if self.source_channels == 1 and self.target_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif self.source_channels == 3 and self.target_channels == 1:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        if self.resize:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.target_mean) / self.target_std


def _per_channel(values, channels: int) -> list[float]:
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values


class EnsembleClassifier(nn.Module):
    """Weighted mean of the members' temperature-scaled softmax; outputs its log.

    ``members``: trained classifiers (same classes, same order); ``temperatures`` one per
    member (1.0: uncalibrated); ``weights`` one per member, normalised to sum to 1;
    ``preprocess`` the ensemble's input (a ``preprocess.json`` mapping) and
    ``member_preprocess`` each member's.
    """

    def __init__(
        self,
        members: list[nn.Module],
        *,
        weights: list[float],
        temperatures: list[float],
        preprocess: dict,
        member_preprocess: list[dict],
    ):
        super().__init__()
        n = len(members)
        if n < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, got {n}")
        if not (len(weights) == len(temperatures) == len(member_preprocess) == n):
            raise ConfigError("an ensemble needs one weight, temperature and preprocess per member")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"member weights must be ≥ 0 and not all 0, got {weights}")
        if any(t <= 0 for t in temperatures):
            raise ConfigError(f"temperatures must be positive, got {temperatures}")
        classes = {int(getattr(m, "num_classes", -1)) for m in members}
        if len(classes) != 1:
            raise ConfigError(f"ensemble members predict different numbers of classes: {classes}")
        self.members = nn.ModuleList(members)
        self.adapters = nn.ModuleList(_InputAdapter(preprocess, p) for p in member_preprocess)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]))
        self.num_classes = classes.pop()
        self.in_chans = int(preprocess["channels"])
        self.preprocess = dict(preprocess)
        self.member_preprocess = [dict(p) for p in member_preprocess]

    def forward(self, x: Tensor) -> Tensor:
        mixed = None
        for k, (member, adapter) in enumerate(zip(self.members, self.adapters)):
            probs = torch.softmax(member(adapter(x)).float() / self.temperatures[k], dim=-1)
            mixed = probs * self.weights[k] if mixed is None else mixed + probs * self.weights[k]
        return torch.log(mixed.clamp_min(1e-12))

    # explanation: Grad-CAM on every member's own layer, averaged by pytorch-grad-cam ----------

    def cam_layer_name(self) -> str:
        """Every member's CAM layer, comma-separated (``members.0.backbone.stage3,...``)."""
        names = []
        for k, member in enumerate(self.members):
            own = member.cam_layer_name() if hasattr(member, "cam_layer_name") else None
            if own is None:
                raise ConfigError(f"ensemble member {k} names no CAM layer; pass --layer")
            names.append(f"members.{k}.{own}")
        return ",".join(names)

    # configuration --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """What the ensemble's ``model.json`` holds: members' configs and how they are mixed."""
        return {
            "name": "ensemble",
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "members": [m.config() for m in self.members],
            "weights": [float(w) for w in self.weights],
            "temperatures": [float(t) for t in self.temperatures],
            "preprocess": self.preprocess,
            "member_preprocess": self.member_preprocess,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EnsembleClassifier:
        """Rebuild the architecture (random weights); load the state dict next."""
        try:
            members = [classifier_from_config(m) for m in config["members"]]
            return cls(
                members,
                weights=list(config["weights"]),
                temperatures=list(config["temperatures"]),
                preprocess=config["preprocess"],
                member_preprocess=list(config["member_preprocess"]),
            )
        except KeyError as exc:
            raise ConfigError(f"ensemble model.json lacks {exc}; is it complete?") from None

    def extra_repr(self) -> str:
        weights = ", ".join(f"{float(w):.3f}" for w in self.weights)
        return f"members={len(self.members)}, weights=[{weights}]"


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Any medsight network from its ``model.json``: one classifier or an ensemble of them."""
    if isinstance(config, dict) and config.get("name") == "ensemble":
        return EnsembleClassifier.from_config(config)
    from medsight.models.detection import detector_from_config, is_detector_config

    if is_detector_config(config):
        return detector_from_config(config)
    return classifier_from_config(config)
