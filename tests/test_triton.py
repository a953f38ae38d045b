"""Triton model repositories: every config.pbtxt parses with Triton's own ModelConfig protobuf."""
from __future__ import annotations

from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from clustervig.export.cli import main as export_main
from clustervig.export.onnx_export import BatchSpec
from clustervig.export.triton import model_config
from clustervig.train import WEIGHTS_DIR


def parse(text: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    text_format.Parse(text, cfg)  # raises on any field Triton does not know
    return cfg


def test_dynamic_batch_config():
    cfg = parse(model_config("m_trt", "tensorrt_plan", BatchSpec(1, 8, 32), 224, 1000, "float16", kind="KIND_GPU"))
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert list(cfg.input[0].dims) == [3, 224, 224] and cfg.input[0].data_type == mc.TYPE_FP16
    assert list(cfg.output[0].dims) == [1000] and cfg.output[0].name == "logits"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_labels_must_match_the_classes(tmp_path):
    import pytest

    from clustervig.export.triton import write_triton_repo

    with pytest.raises(ValueError, match="3 class names for 10 classes"):
        write_triton_repo(tmp_path, "m", tmp_path / "x.onnx", BatchSpec(1, 1, 1), 32, 10, labels=["a", "b", "c"])


def test_static_batch_config_has_no_batching():
    cfg = parse(model_config("m_onnx", "onnxruntime_onnx", BatchSpec(4, 4, 4), 32, 10))
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [4, 3, 32, 32]
    assert not cfg.HasField("dynamic_batching")


def test_cvig_export_writes_repository(tmp_path):
    repo = tmp_path / "repo"
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--dynamic-batch", "1:4:16", "--fp16", "--no-validate",
                                           "--triton-repo", str(repo), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    cfg = parse((repo / "cvig_nano_onnx" / "config.pbtxt").read_text())
    assert cfg.name == "cvig_nano_onnx" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert (repo / "cvig_nano_onnx" / "1" / "model.onnx").stat().st_size > 0
    # Triton's classification extension: class names beside the config, named by the output
    assert cfg.output[0].label_filename == "labels.txt"
    names = (repo / "cvig_nano_onnx" / "labels.txt").read_text().splitlines()
    assert len(names) == 1000 and names[0] == "tench"
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "No TensorRT engine was built for `cvig_nano` here" in readme
    # a second model in the same repository: both configs stay, the README describes both
    res = CliRunner().invoke(export_main, ["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--no-validate",
                                           "--triton-repo", str(repo), "-o", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert parse((repo / "cvig_nano_onnx" / "config.pbtxt").read_text()).max_batch_size == 16
    assert list(parse((repo / "cvig_digits_onnx" / "config.pbtxt").read_text()).input[0].dims) == [1, 3, 32, 32]
    readme = (repo / "README.md").read_text()
    assert "| `cvig_nano_onnx` | onnxruntime_onnx | [B, 3, 224, 224] float32" in readme
    assert "| `cvig_digits_onnx` | onnxruntime_onnx | [B, 3, 32, 32] float32" in readme and "[B, 10]" in readme
    assert not any(p.name.startswith(".") for p in repo.iterdir())  # no staging folders left


def test_bad_triton_repo_path_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for bad, message in [(blocker, "exists and is not a folder"), (blocker / "repo", "is not a folder")]:
        res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "--triton-repo", str(bad),
                                               "-o", str(tmp_path / "out")])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
        assert "[1/" not in res.output and not (tmp_path / "out").exists()
