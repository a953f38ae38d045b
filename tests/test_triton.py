"""Triton model repositories: every config.pbtxt parses with Triton's own ModelConfig protobuf."""
from __future__ import annotations

import json

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


# --- the python backend: model.py outside the server (the server itself: test_triton_server.py) ---------


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


class _FakeError:
    def __init__(self, message):
        self.message = message


class _FakeUtils:
    """The parts of triton_python_backend_utils that model.py uses."""
    Tensor = _FakeTensor
    InferenceResponse = _FakeResponse
    TritonError = _FakeError

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _FakeTensor(name, request[name])


def load_model_py(folder):
    """The repository's model.py as a module, with the stand-in backend utilities, initialised as Triton would."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"model_{abs(hash(str(folder)))}", folder / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.pb_utils = _FakeUtils
    model = mod.TritonPythonModel()
    cfg = parse((folder / "config.pbtxt").read_text())
    model.initialize({"model_config": json.dumps({"max_batch_size": cfg.max_batch_size}),
                      "model_repository": str(folder), "model_version": "1"})
    return model


def test_python_backend_repository_and_model(tmp_path):
    import numpy as np
    import onnxruntime as ort

    repo = tmp_path / "repo"
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--dynamic-batch", "1:4:8", "--no-validate",
                                           "--plugins", "--triton-repo", str(repo), "--triton-backend", "python",
                                           "--triton-backend", "onnxruntime", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", "cvig_nano_onnx", "cvig_nano_python"]
    cfg = parse((repo / "cvig_nano_python" / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.platform == "" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4] and cfg.output[0].label_filename == "labels.txt"
    onnx_cfg = parse((repo / "cvig_nano_onnx" / "config.pbtxt").read_text())
    assert onnx_cfg.platform == "onnxruntime_onnx" and onnx_cfg.input == cfg.input and onnx_cfg.output == cfg.output
    from clustervig.export.triton import PYTHON_MODEL

    assert (repo / "cvig_nano_python" / "1" / "model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    readme = (repo / "README.md").read_text()
    assert "| `cvig_nano_python` | python |" in readme and "`numpy<2` and `onnxruntime`" in readme

    # model.py: requests of 1, 3 and 2 images run as one batch of 6; each gets its own rows
    model = load_model_py(repo / "cvig_nano_python")
    rng = np.random.default_rng(0)
    reqs = [{"images": rng.standard_normal((n, 3, 224, 224)).astype(np.float32)} for n in (1, 3, 2)]
    out = model.execute(reqs)
    sess = ort.InferenceSession(str(tmp_path / "out" / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    for r, o in zip(reqs, out):
        assert o.error is None and o.output_tensors[0].name == "logits"
        want = sess.run(None, {"images": r["images"]})[0]
        np.testing.assert_allclose(o.output_tensors[0].as_numpy(), want, rtol=0, atol=1e-4)
    # a failing run answers every request of the batch with an error instead of raising
    out = model.execute([{"images": np.zeros((1, 3, 64, 64), np.float32)}, reqs[0]])
    assert len(out) == 2 and all(o.error is not None and "ONNX Runtime failed" in o.error.message for o in out)

    # a plugin graph in the same model.py runs its plugin nodes on the host kernels
    import shutil

    shutil.copy(tmp_path / "out" / "model_plugins.onnx", repo / "cvig_nano_python" / "1" / "model.onnx")
    plugin_model = load_model_py(repo / "cvig_nano_python")
    got = plugin_model.execute(reqs[1:2])[0].output_tensors[0].as_numpy()
    np.testing.assert_allclose(got, sess.run(None, {"images": reqs[1]["images"]})[0], rtol=0, atol=1e-4)


def test_triton_backend_errors(tmp_path):
    out = tmp_path / "out"
    # --triton-backend without a repository; tensorrt without an engine: refused before any work
    for args, message in [(["--triton-backend", "python"], "add --triton-repo DIR"),
                          (["--triton-repo", str(tmp_path / "r"), "--triton-backend", "tensorrt", "--no-engine"],
                           "drop --no-engine"),
                          (["--triton-repo", str(tmp_path / "r"), "--triton-backend", "tensorrt"],
                           "the tensorrt Python package is not installed")]:
        res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", *args, "-o", str(out)])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
        assert "[1/" not in res.output and not out.exists() and not (tmp_path / "r").exists()
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--triton-repo", str(tmp_path / "r"),
                                           "--triton-backend", "onnx", "-o", str(out)])
    assert res.exit_code == 2 and "'onnxruntime', 'python', 'tensorrt'" in res.output
