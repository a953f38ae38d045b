"""Checkpoint formats, distillation head handling and mismatch errors."""
from __future__ import annotations

import pytest
import torch

import clustervig
from clustervig import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

from conftest import make_model, varied_images


@pytest.fixture(scope="module")
def trained():
    x = varied_images(2, 224, seed=21)
    return make_model("cvig_nano", num_classes=10, calib_images=x), x


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix", "model_module_prefix"])
def test_checkpoint_formats_load_identically(tmp_path, trained, wrap):
    src, x = trained
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd, "optimizer": {}},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "model_module_prefix": {"model": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / "ck.pth"
    torch.save(obj, path)
    dst = clustervig.create_model("cvig_nano", pretrained=path, num_classes=10)
    assert torch.equal(_logits(dst, x), _logits(src, x))


def test_without_distillation_head(tmp_path, trained):
    src, x = trained
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("dist_head.")}
    torch.save(sd, tmp_path / "nodist.pth")
    dst = clustervig.create_model("cvig_nano", pretrained=tmp_path / "nodist.pth", num_classes=10).eval()
    assert dst.dist_head is None and not dst.cfg.distillation
    with torch.no_grad():
        expect = src.head(src.prediction(src.forward_features(x))).flatten(1)
    assert torch.allclose(_logits(dst, x), expect, atol=1e-6)


def test_distillation_head_added_to_model_built_without(tmp_path, trained):
    src, x = trained
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    dst = clustervig.create_model("cvig_nano", num_classes=10, distillation=False)
    load_checkpoint(dst, tmp_path / "ck.pth")
    assert torch.equal(_logits(dst, x), _logits(src, x))


def test_mismatch_lists_missing_and_unexpected_keys(tmp_path, trained):
    src, _ = trained
    sd = dict(src.state_dict())
    sd.pop("blocks.1.ffn.fc1.0.weight")
    sd["blocks.9.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as ei:
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "bad.pth", num_classes=10)
    msg = str(ei.value)
    assert "missing keys (1): blocks.1.ffn.fc1.0.weight" in msg
    assert "unexpected keys (1): blocks.9.extra.weight" in msg


def test_num_classes_mismatch_hint(tmp_path, trained):
    src, _ = trained
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    with pytest.raises(CheckpointError) as ei:
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "ck.pth")  # 1000 classes
    assert "shape mismatches" in str(ei.value)
    assert "--num-classes 10 on the command line, num_classes=10 in Python" in str(ei.value)


def test_wrong_variant_hint(tmp_path, trained):
    src, _ = trained
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="choose the matching variant"):
        clustervig.create_model("cvig_ti", pretrained=tmp_path / "ck.pth", num_classes=10)


def test_wrong_gcn_is_reported(tmp_path, trained):
    src, _ = trained
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="local-update"):
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "ck.pth", num_classes=10, gcn="gin")


def test_missing_and_corrupt_files(tmp_path, trained):
    with pytest.raises(CheckpointError, match="does not exist"):
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "nope.pth")
    src, _ = trained
    good = tmp_path / "good.pth"
    torch.save(src.state_dict(), good)
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="could not be read"):
        clustervig.create_model("cvig_nano", pretrained=trunc, num_classes=10)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="could not be read"):
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "text.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        clustervig.create_model("cvig_nano", pretrained=tmp_path / "list.pth")


def test_pretrained_true_is_refused():
    with pytest.raises(ValueError, match="local checkpoint"):
        clustervig.create_model("cvig_nano", pretrained=True)


def test_save_and_rebuild_from_recorded_config(tmp_path, trained):
    src, x = trained
    path = save_checkpoint(src, tmp_path / "sub" / "ck.pth", metrics={"acc": 0.5})
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    dst = model_from_checkpoint(path)
    assert dst.cfg.num_classes == 10 and dst.cfg.name == "cvig_nano"
    assert torch.equal(_logits(dst, x), _logits(src, x))
    ref = model_from_checkpoint(path, form="reference")
    assert ref.form == "reference"
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="records no model config"):
        model_from_checkpoint(tmp_path / "plain.pth")
