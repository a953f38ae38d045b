"""One inference interface over ONNX Runtime and TensorRT (Polygraphy-style: open, infer, close).

``open_session(path)`` picks the backend from the file: ``.onnx`` -> ONNX
Runtime (CPU by default; CUDA / TensorRT execution providers when installed
and asked for; plugin graphs run with the CPU reference ops), ``.plan`` /
``.engine`` -> TensorRT. Both return FP32 logits for FP32 ``[B, 3, H, W]``
images and expose the preprocessing recorded at export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


class RuntimeErrorWithFix(RuntimeError):
    """A model file that cannot be run, with the file and the fix in the message."""


class Session:
    path: Path
    metadata: Dict[str, str]
    max_batch: Optional[int] = None

    @property
    def config(self) -> Dict:
        return json.loads(self.metadata.get("clustervig.config", "{}"))

    @property
    def preprocess(self) -> Dict:
        pre = self.metadata.get("clustervig.preprocess")
        if pre is None:
            raise RuntimeErrorWithFix(f"{self.path} records no preprocessing (was it exported by cvig-export?)")
        return json.loads(pre)

    def infer(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OrtSession(Session):
    def __init__(self, path: Path, providers: Optional[Sequence[str]] = None, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeErrorWithFix(f"model {self.path} does not exist")
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:
            raise RuntimeErrorWithFix(f"{self.path} is not a readable ONNX file ({type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:120]}); it may be truncated: export it again") from None
        self.metadata = {p.key: p.value for p in model.metadata_props}
        available = ort.get_available_providers()
        wanted = list(providers) if providers else ["CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise RuntimeErrorWithFix(f"ONNX Runtime here has no {missing} (available: {available}); install "
                                      "onnxruntime-gpu for CUDA/TensorRT providers or use the default CPU provider")
        try:
            if any(n.domain == "cvig" for n in model.graph.node):
                from clustervig.export.plugin_graph import ort_session

                self.sess = ort_session(model)
            else:
                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                if threads:
                    opts.intra_op_num_threads = threads
                self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=wanted)
        except Exception as exc:
            raise RuntimeErrorWithFix(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0][:200]}") from None
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_fp16 = "float16" in inp.type
        b = inp.shape[0]
        self.max_batch = b if isinstance(b, int) else None
        self.static_batch = isinstance(b, int)

    def infer(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float16 if self.input_fp16 else np.float32)
        if self.static_batch and x.shape[0] != self.max_batch:
            return self._infer_static(x)
        return np.asarray(self.sess.run(None, {self.input_name: x})[0], dtype=np.float32)

    def _infer_static(self, x: np.ndarray) -> np.ndarray:
        """Feed a static-batch graph in chunks, padding the last one."""
        b = self.max_batch
        out: List[np.ndarray] = []
        for i in range(0, len(x), b):
            chunk = x[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            out.append(np.asarray(self.sess.run(None, {self.input_name: chunk})[0][:n], dtype=np.float32))
        return np.concatenate(out)


class TrtSession(Session):
    """A serialized TensorRT engine (10.3+ / 11.x API), with cuda-python for memory and streams.

    cuda-python is NVIDIA's official binding of the CUDA runtime; it adds no
    framework dependency (unlike PyTorch or CuPy) and exposes streams,
    pinned host memory and graphs one to one.
    """

    def __init__(self, path: Path, plugin_library: Optional[Path] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeErrorWithFix(f"engine {self.path} does not exist")
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart  # noqa: F401
        except ImportError as exc:
            raise RuntimeErrorWithFix(f"running {self.path} needs TensorRT and cuda-python ({exc.name} is not installed); "
                                      "on a machine without them run the ONNX file instead") from None
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        if plugin_library is not None:
            if not Path(plugin_library).is_file():
                raise RuntimeErrorWithFix(f"plugin library {plugin_library} does not exist: build it with "
                                          "cmake -S plugins -B build/plugins -DCVIG_TRT_ROOT=...")
            trt.get_plugin_registry().load_library(str(plugin_library))
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise RuntimeErrorWithFix(
                f"TensorRT {trt.__version__} could not deserialize {self.path}: it is corrupt, was built by another "
                "TensorRT version, or needs the plugin library (pass plugin_library=/--plugins-lib); rebuild the engine "
                "on this machine with cvig-export --engine")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.metadata = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        meta = self.path.with_suffix(".json")
        if meta.is_file():  # cvig-export writes the ONNX metadata next to the engine
            self.metadata = json.loads(meta.read_text())

    def infer(self, images: np.ndarray) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        trt = self.trt
        x = np.ascontiguousarray(images, dtype=np.float16 if self.engine.get_tensor_dtype(self.input_name) == trt.DataType.HALF else np.float32)
        self.context.set_input_shape(self.input_name, x.shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = np.float16 if self.engine.get_tensor_dtype(self.output_name) == trt.DataType.HALF else np.float32
        out = np.empty(out_shape, dtype=out_dtype)
        _, stream = cudart.cudaStreamCreate()
        _, d_in = cudart.cudaMallocAsync(x.nbytes, stream)
        _, d_out = cudart.cudaMallocAsync(out.nbytes, stream)
        try:
            cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
            self.context.set_tensor_address(self.input_name, d_in)
            self.context.set_tensor_address(self.output_name, d_out)
            if not self.context.execute_async_v3(stream):
                raise RuntimeErrorWithFix(f"TensorRT execution of {self.path} failed")
            cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)
            cudart.cudaStreamSynchronize(stream)
        finally:
            cudart.cudaFreeAsync(d_in, stream)
            cudart.cudaFreeAsync(d_out, stream)
            cudart.cudaStreamSynchronize(stream)
            cudart.cudaStreamDestroy(stream)
        return out.astype(np.float32)


def open_session(path, providers: Optional[Sequence[str]] = None, plugin_library: Optional[Path] = None) -> Session:
    path = Path(path)
    if path.suffix in (".plan", ".engine", ".trt"):
        return TrtSession(path, plugin_library)
    if path.suffix == ".onnx":
        return OrtSession(path, providers)
    raise RuntimeErrorWithFix(f"{path}: unknown model type '{path.suffix}'; give an .onnx file or a .plan/.engine")
