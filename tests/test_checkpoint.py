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


def _damaged_files(tmp_path, good):
    """file name -> (bytes, what the message must say)"""
    legacy = tmp_path / "legacy-src.pth"
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    return {
        "empty.pth": (b"", "is empty (0 bytes)"),
        "half.pth": (data[: len(data) // 2], "truncated or corrupt (RuntimeError: PytorchStreamReader failed reading zip archive"),
        "head.pth": (data[:64], "truncated or corrupt"),
        "legacy-cut.pth": (legacy.read_bytes()[:-16], "in a legacy pickle file); "),
        # a legacy pickle header then garbage: torch's weights-only unpickler stops at it (not a refused object)
        "pickle-garbage.pth": (b"\x80\x02not a checkpoint", "truncated or corrupt (UnpicklingError: Unsupported operand "
                                                             "110 in a legacy pickle file); "),
        "page.pth": (b"<!DOCTYPE html><html>Not Found</html>", "could not be read: it is not a PyTorch checkpoint (its first bytes are b'<!DOCTYPE html><', a web page"),
    }


def test_empty_truncated_and_foreign_files_raise_checkpoint_error(tmp_path, trained):
    """Python API: a CheckpointError with one line saying what is wrong with the file (an empty file used to
    raise IndexError from the error handling itself)."""
    src, _ = trained
    good = tmp_path / "good.pth"
    torch.save(src.state_dict(), good)
    for name, (data, says) in _damaged_files(tmp_path, good).items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as ei:
            clustervig.create_model("cvig_nano", pretrained=tmp_path / name, num_classes=10)
        msg = str(ei.value)
        assert says in msg and str(tmp_path / name) in msg and "\n" not in msg, msg
        assert msg.endswith("download it or save it again with torch.save") or "not a PyTorch checkpoint" in msg, msg


def test_commands_refuse_damaged_checkpoints_in_one_line(tmp_path, trained):
    """cvig export --checkpoint, cvig convert --from authors, cvig profile --checkpoint: exit 1 and one
    'Error:' line, no traceback."""
    from click.testing import CliRunner

    from clustervig.cli import cvig

    src, _ = trained
    good = tmp_path / "good.pth"
    torch.save(src.state_dict(), good)
    for name, (data, says) in _damaged_files(tmp_path, good).items():
        path = tmp_path / name
        path.write_bytes(data)
        for args in (["export", "--checkpoint", str(path), "--no-validate", "-o", str(tmp_path / "out")],
                     ["convert", "--from", "authors", str(path), "-o", str(tmp_path / "conv.pth")],
                     ["profile", "--checkpoint", str(path)]):
            res = CliRunner().invoke(cvig, args)
            assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit), res.exception
            errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and says in errors[0] and "Traceback" not in res.output, (args, res.output)
            assert res.output.rstrip().endswith(errors[0]), res.output  # the error is the last word
        assert not (tmp_path / "out").exists() and not (tmp_path / "conv.pth").exists()


def test_pickled_objects_are_refused_with_what_and_how(tmp_path, trained):
    """A checkpoint holding pickled Python objects: refused (weights_only), and the message says so, why,
    and how to load it when the file is trusted; the whole message, not torch's cut mid-sentence."""
    import os

    src, _ = trained
    path = tmp_path / "objects.pth"
    torch.save({"model": src.state_dict(), "hook": os.getcwd}, path)
    with pytest.raises(CheckpointError) as ei:
        clustervig.create_model("cvig_nano", pretrained=path, num_classes=10)
    msg = str(ei.value)
    assert f"checkpoint {path} holds non-tensor Python objects (posix.getcwd) besides its tensors" in msg
    assert "could run code from the file" in msg and "torch.load(PATH, weights_only=False)" in msg
    assert "torch.save(state_dict, NEW.pth)" in msg and "incomplete" not in msg and "\n" not in msg
    # the way the message gives works: the trusted file's state_dict, saved alone, loads
    trusted = torch.load(path, weights_only=False)["model"]
    torch.save(trusted, tmp_path / "new.pth")
    x = varied_images(2, 224, seed=21)
    assert torch.equal(_logits(clustervig.create_model("cvig_nano", pretrained=tmp_path / "new.pth", num_classes=10), x),
                       _logits(src, x))
    # cvig convert reads the authors' files with argparse.Namespace allowed, nothing else
    from clustervig.convert import ConvertError, read_authors_checkpoint

    with pytest.raises(ConvertError, match=r"non-tensor Python objects \(posix.getcwd\)"):
        read_authors_checkpoint(path)
