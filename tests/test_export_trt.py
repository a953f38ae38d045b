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
    assert hint.startswith("trtexec ") and "--engine" not in hint
    plug = build_command_hint("out/p.onnx", "out/p.plan", BatchSpec(1, 1, 1), 224, plugin_library="lib/libcvig_plugins.so")
    assert plug.endswith("--dynamicPlugins=lib/libcvig_plugins.so") and "Shapes" not in plug


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


class _Registry:
    """Stands in for trt.IPluginRegistry: load_library's None return, creators already registered or not."""

    def __init__(self, handle, registered, raises=None):
        self.handle, self.registered, self.raises = handle, registered, raises

    def load_library(self, path):
        if self.raises:
            raise self.raises
        return self.handle

    def get_creator(self, name, version, namespace=""):
        return object() if name in self.registered and version == "1" and namespace == "" else None


class _Trt:
    __version__ = "10.3.0"

    def __init__(self, registry):
        self.registry = registry

    def get_plugin_registry(self):
        return self.registry


def test_plugin_library_load_result_is_checked(tmp_path):
    from clustervig.export.trt_build import PLUGIN_NAMES, load_plugin_library

    lib = tmp_path / "libcvig_plugins.so"
    load_plugin_library(_Trt(_Registry(object(), ())), lib)  # loaded
    load_plugin_library(_Trt(_Registry(None, PLUGIN_NAMES)), lib)  # None, but already registered: a second session
    with pytest.raises(TensorRTUnavailable, match=r"could not load the plugin library .*CvigKMeans, CvigKMeansCentroids, CvigPartitionedKNN"):
        load_plugin_library(_Trt(_Registry(None, ("CvigSegmentMean", "CvigGatherMaxRel"))), lib)
    with pytest.raises(TensorRTUnavailable, match="cannot load the plugin library .*undefined symbol"):
        load_plugin_library(_Trt(_Registry(None, (), raises=RuntimeError("undefined symbol: getCreators"))), lib)
