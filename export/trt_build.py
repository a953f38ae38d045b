"""TensorRT engine build, kept thin (docs/tensorrt.md: 10.3+ and 11.x, one code path).

Strongly typed networks only: precision comes from the ONNX tensor types
(FP16 graph) and Q/DQ nodes (INT8); no builder precision flags, which
TensorRT 11 removed. Everything here needs the ``tensorrt`` package; without
it :class:`TensorRTUnavailable` explains how to build elsewhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from clustervig.model import as_hw
from clustervig.utils import write_bytes_atomic


class TensorRTUnavailable(RuntimeError):
    pass


def tensorrt_module():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise TensorRTUnavailable("the tensorrt Python package is not installed") from None
    return trt


PLUGIN_NAMES = ("CvigKMeans", "CvigKMeansCentroids", "CvigPartitionedKNN", "CvigSegmentMean", "CvigGatherMaxRel")


def load_plugin_library(trt, path: Path) -> None:
    """Register libcvig_plugins.so with TensorRT's plugin registry, checking the result.

    ``IPluginRegistry.load_library`` returns None instead of raising when it
    fails, which includes a library whose creators are already registered (a
    second session in one process): that case is fine, anything else is an
    error that names the library and the fix.
    """
    registry = trt.get_plugin_registry()
    try:
        handle = registry.load_library(str(path))
    except Exception as exc:  # bindings raise on e.g. a missing symbol
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} cannot load the plugin library {path} ({exc}); "
                                  "rebuild it against this TensorRT (cmake -DCVIG_TRT_ROOT=...)") from None
    if handle is None:
        missing = [n for n in PLUGIN_NAMES if registry.get_creator(n, "1", "") is None]
        if missing:
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} could not load the plugin library {path} and "
                                      f"{', '.join(missing)} are not registered: it was likely built for another "
                                      f"TensorRT major (rebuild with cmake -DCVIG_TRT_ROOT=<TensorRT "
                                      f"{trt.__version__.split('.')[0]}.x>), or the CUDA runtime it links "
                                      "(libcudart) is not on the library path")


def build_command_hint(onnx_path: Path, engine_path: Path, batch, img_size, tf32: bool = False,
                       plugin_library: Optional[str] = None) -> str:
    """The trtexec command that builds the engine cvig-export would build (strongly typed, TF32 off);
    ``img_size`` is S (square) or (H, W)."""
    shapes = ""
    if batch.dynamic:
        h, w = as_hw(img_size)
        hw = f"3x{h}x{w}"
        shapes = (f" --minShapes=images:{batch.min}x{hw} --optShapes=images:{batch.opt}x{hw}"
                  f" --maxShapes=images:{batch.max}x{hw}")
    plugins = f" --dynamicPlugins={plugin_library}" if plugin_library else ""
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --stronglyTyped"
            f"{'' if tf32 else ' --noTF32'}{shapes}{plugins}")


def build_engine(onnx_path: Path, engine_path: Path, batch=None, img_size=None,
                 workspace_mib: int = 2048, timing_cache: Optional[Path] = None, plugin_library: Optional[Path] = None,
                 opt_level: int = 3, tf32: bool = False) -> Path:
    """Parse ``onnx_path`` into a strongly typed network and write a serialized engine atomically.

    A graph with a dynamic batch gets the optimization profile ``batch`` (min:opt:max) for its ``images``
    input at ``img_size`` (S, or (H, W)); a graph with static shapes (a static-batch export, the one-layer plugin graphs
    of ``cvig doctor``) needs none."""
    trt = tensorrt_module()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_library is not None:
        load_plugin_library(trt, Path(plugin_library))
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if major < 11:  # 11 networks are always strongly typed; the flag is deprecated there
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.builder_optimization_level = opt_level
    if not tf32:
        # TF32 (on by default in 10.x and 11.x) rounds FP32 matmul inputs to a 10-bit
        # mantissa, FP16's: the FP32 islands (k-means distances, k-NN similarity) would
        # flip the labels they exist to protect
        config.clear_flag(trt.BuilderFlag.TF32)
    dynamic = [network.get_input(i).name for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        if batch is None or img_size is None or dynamic != ["images"]:
            raise RuntimeError(f"{onnx_path} has dynamic inputs {dynamic}: an engine is built for a dynamic "
                               "batch of 'images' only, given its batch range and image size")
        profile = builder.create_optimization_profile()
        h, w = as_hw(img_size)
        shape = lambda b: (b, 3, h, w)  # noqa: E731
        profile.set_shape("images", shape(batch.min), shape(batch.opt), shape(batch.max))
        config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    write_bytes_atomic(Path(engine_path), bytes(plan))
    if timing_cache:
        write_bytes_atomic(Path(timing_cache), bytes(config.get_timing_cache().serialize()))
    return Path(engine_path)
