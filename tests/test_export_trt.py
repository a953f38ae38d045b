"""TensorRT engine build: real build where TensorRT exists, a clear message everywhere else."""
from __future__ import annotations

import importlib.util

import pytest

from clustervig.export.onnx_export import BatchSpec
from clustervig.export.trt_build import TensorRTUnavailable, build_command_hint, build_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the unavailable path cannot be exercised")
def test_build_without_tensorrt_says_so(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="tensorrt Python package is not installed"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", BatchSpec(1, 2, 4), 224)
    assert not (tmp_path / "m.plan").exists()


def test_build_hint_names_shapes():
    hint = build_command_hint("out/m.onnx", "out/m.plan", BatchSpec(1, 8, 32), 224)
    assert "--stronglyTyped" in hint and "--minShapes=images:1x3x224x224" in hint and "--maxShapes=images:32x3x224x224" in hint
    # TF32 is on by default in TensorRT: FP32 islands need it off, unless asked for
    assert "--noTF32" in hint
    assert "--noTF32" not in build_command_hint("out/m.onnx", "out/m.plan", BatchSpec(1, 1, 1), 224, tf32=True)


@pytest.mark.trt
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed on this machine")
def test_engine_builds_and_runs(tmp_path):

    import clustervig
    from clustervig.export.onnx_export import export_onnx
    from clustervig.export.compare import run_compare

    model = clustervig.create_model("cvig_nano").eval()
    export_onnx(model, tmp_path / "m.onnx", BatchSpec(1, 2, 4))
    plan = build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", BatchSpec(1, 2, 4), 224)
    assert plan.stat().st_size > 0
    assert run_compare([plan], model, 1e-3, 1e-3, "photos", 2)
