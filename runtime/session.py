"""One inference interface over ONNX Runtime and TensorRT (Polygraphy-style: open, infer, close).

``open_session(path)`` picks the backend from the file: ``.onnx`` -> ONNX
Runtime (CPU by default; CUDA / TensorRT execution providers when installed
and asked for; plugin graphs run with the CPU reference ops), ``.plan`` /
``.engine`` -> TensorRT. Both return FP32 logits for FP32 ``[B, 3, H, W]``
images (a backbone exported with ``cvig export --features``: its feature maps
by output name) and expose the preprocessing recorded at export.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class RuntimeErrorWithFix(RuntimeError):
    """A model file that cannot be run, with the file and the fix in the message."""


class Session:
    """An open model: ``infer(images)`` -> FP32 logits, with the config and preprocessing recorded at export.

    A backbone (``cvig export --features``; :attr:`is_backbone`) returns a dict of its feature maps instead,
    ``{name: float32 [B, C, h, w]}`` in :attr:`output_names` order (``block15``, or ``p3``..``p6`` of the
    feature pyramid); :attr:`outputs` gives each map's channels, stride and shape as recorded at export.

    Made by :func:`open_session`; use it as a context manager (``close()`` frees the runtime's resources).
    ``max_batch`` is the largest batch one call runs at once (``None``: any), ``static_batch`` whether the model
    takes exactly that batch, and ``batch_profile`` the (min, opt, max) batches the artifact was built for.
    """

    path: Path
    metadata: Dict[str, str]
    max_batch: Optional[int] = None
    static_batch: bool = False

    @property
    def batch_profile(self) -> Optional[Tuple[int, int, int]]:
        """(min, opt, max) batch of the artifact: its static batch three times, the ``--dynamic-batch`` range
        recorded at export (``clustervig.batch`` metadata), or None when nothing says (any batch)."""
        if self.static_batch and self.max_batch:
            return (self.max_batch,) * 3
        try:
            parts = tuple(int(v) for v in str(self.metadata.get("clustervig.batch", "")).split(":"))
        except ValueError:
            return None
        if len(parts) == 3:
            return parts  # type: ignore[return-value]
        return None

    @property
    def config(self) -> Dict:
        return json.loads(self.metadata.get("clustervig.config", "{}"))

    @property
    def outputs(self) -> Optional[List[Dict]]:
        """A backbone's maps as recorded at export (``name``, ``channels``, ``stride``, ``shape`` [C, h, w]);
        None for a classifier."""
        rec = self.metadata.get("clustervig.outputs")
        return json.loads(rec) if rec else None

    @property
    def is_backbone(self) -> bool:
        """Whether :meth:`infer` returns named feature maps (a ``--features`` export) rather than logits."""
        return self.outputs is not None

    @property
    def output_names(self) -> List[str]:
        return [o["name"] for o in self.outputs] if self.is_backbone else ["logits"]

    def _named(self, arrays: Sequence[np.ndarray], names: Sequence[str]):
        """The runtime's outputs as :meth:`infer` returns them: the logits, or a backbone's maps by name."""
        if not self.is_backbone:
            return np.asarray(arrays[0], dtype=np.float32)
        by_name = dict(zip(names, arrays))
        missing = [n for n in self.output_names if n not in by_name]
        if missing:
            raise RuntimeErrorWithFix(f"{self.path} records outputs {self.output_names} but has no {missing}: "
                                      "export it again")
        return {n: np.asarray(by_name[n], dtype=np.float32) for n in self.output_names}

    @property
    def preprocess(self) -> Dict:
        pre = self.metadata.get("clustervig.preprocess")
        if pre is None:
            raise RuntimeErrorWithFix(f"{self.path} records no preprocessing (was it exported by cvig-export?)")
        return json.loads(pre)

    def infer(self, images: np.ndarray):
        raise NotImplementedError

    def _infer_static(self, x: np.ndarray):
        """Feed a static-batch model in chunks of its batch, padding the last one."""
        b = self.max_batch
        out: List = []
        for i in range(0, len(x), b):
            chunk = x[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            res = self.infer(chunk)
            out.append({k: v[:n] for k, v in res.items()} if isinstance(res, dict) else res[:n])
        if isinstance(out[0], dict):
            return {k: np.concatenate([o[k] for o in out]) for k in out[0]}
        return np.concatenate(out)

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
        from clustervig.utils import ort_session_options

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
                opts = ort_session_options(threads)
                self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=wanted)
        except Exception as exc:
            raise RuntimeErrorWithFix(f"ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0][:200]}") from None
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_fp16 = "float16" in inp.type
        b = inp.shape[0]
        self.max_batch = b if isinstance(b, int) else None
        self.static_batch = isinstance(b, int)

    def infer(self, images: np.ndarray):
        x = images.astype(np.float16 if self.input_fp16 else np.float32)
        if self.static_batch and x.shape[0] != self.max_batch:
            return self._infer_static(x)
        outs = self.sess.run(None, {self.input_name: x})
        return self._named(outs, [o.name for o in self.sess.get_outputs()])


def _cuda_check(result, what: str):
    """cuda-python returns (error, *values): raise on error, return the values."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeErrorWithFix(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class _PinnedBuffer:
    """Page-locked host memory + device memory of the same size, grown on demand."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.host = 0
        self.device = 0

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True when the buffers moved (captured CUDA graphs are then stale)."""
        from cuda.bindings import runtime as cudart

        if nbytes <= self.nbytes:
            return False
        self.free()
        self.host = _cuda_check(cudart.cudaMallocHost(nbytes), "cudaMallocHost")
        self.device = _cuda_check(cudart.cudaMalloc(nbytes), "cudaMalloc")
        self.nbytes = nbytes
        return True

    def host_array(self, shape, dtype) -> np.ndarray:
        import ctypes

        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = (ctypes.c_byte * count).from_address(int(self.host))
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.host:
            cudart.cudaFreeHost(self.host)
        if self.device:
            cudart.cudaFree(self.device)
        self.nbytes, self.host, self.device = 0, 0, 0


class TrtSession(Session):
    """A serialized TensorRT engine (10.3+ / 11.x API), with cuda-python for memory, streams and graphs.

    cuda-python is NVIDIA's official binding of the CUDA runtime; it adds no
    framework dependency (unlike PyTorch or CuPy) and exposes streams,
    pinned host memory and graphs one to one.

    One CUDA stream per session; input and output live in pinned host buffers
    mirrored by device buffers (grown to the largest batch seen), so copies
    are truly asynchronous. With ``cuda_graph=True`` the enqueue for each
    input shape is captured once into a CUDA graph and replayed (TensorRT
    kernels launch with no per-call CPU overhead); a new shape or a buffer
    reallocation captures again.
    """

    def __init__(self, path: Path, plugin_library: Optional[Path] = None, cuda_graph: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeErrorWithFix(f"engine {self.path} does not exist")
        plugin_library = plugin_library_for(self.path, plugin_library)
        if plugin_library is not None and not Path(plugin_library).is_file():
            raise RuntimeErrorWithFix(f"plugin library {plugin_library} does not exist: build it with "
                                      "`cvig build-plugins` (or cmake, plugins/README.md)")
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise RuntimeErrorWithFix(f"running {self.path} needs TensorRT and cuda-python ({exc.name} is not installed); "
                                      "on a machine without them run the ONNX file instead") from None
        self.trt = trt
        self.cuda_graph = cuda_graph
        logger = trt.Logger(trt.Logger.WARNING)
        if plugin_library is not None:
            from clustervig.export.trt_build import TensorRTUnavailable, load_plugin_library

            try:
                load_plugin_library(trt, Path(plugin_library))
            except TensorRTUnavailable as exc:
                raise RuntimeErrorWithFix(str(exc)) from None
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise RuntimeErrorWithFix(
                f"TensorRT {trt.__version__} could not deserialize {self.path}: it is corrupt, was built by another "
                "TensorRT version, or needs the plugin library (pass plugin_library=/--plugins-lib); rebuild the engine "
                "on this machine with cvig-export --engine")
        self._runtime, self.engine = runtime, engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_tensors = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.output_name = self.output_tensors[0]
        batch = int(engine.get_tensor_shape(self.input_name)[0])
        self.static_batch = batch > 0  # an engine from a static-batch ONNX has no optimization profile
        self.max_batch = batch if self.static_batch else int(engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self._profile = None if self.static_batch else tuple(
            int(shape[0]) for shape in engine.get_tensor_profile_shape(self.input_name, 0))
        self.metadata = engine_metadata(self.path)
        self._stream = _cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._in = _PinnedBuffer()
        self._outs = {n: _PinnedBuffer() for n in self.output_tensors}  # a backbone has several outputs
        self._graphs: Dict[tuple, object] = {}

    @property
    def batch_profile(self) -> Optional[Tuple[int, int, int]]:
        """(min, opt, max) batch of the engine's optimization profile (its static batch three times)."""
        return (self.max_batch,) * 3 if self.static_batch else self._profile

    def _dtype(self, name: str):
        t = self.engine.get_tensor_dtype(name)
        if t == self.trt.DataType.HALF:
            return np.float16
        if t == self.trt.DataType.FLOAT:
            return np.float32
        raise RuntimeErrorWithFix(f"{self.path}: tensor '{name}' has TensorRT type {t}; cvig runs engines with float32 "
                                  "or float16 images and logits: re-export without changing the I/O types, or with --fp16-io")

    def infer(self, images: np.ndarray):
        from cuda.bindings import runtime as cudart

        if images.ndim != 4 or images.shape[1] != 3:
            raise RuntimeErrorWithFix(f"{self.path} takes [B, 3, H, W] images, got shape {tuple(images.shape)}")
        if images.shape[0] > self.max_batch or (self.static_batch and images.shape[0] != self.max_batch):
            return self._infer_static(images)
        x = np.ascontiguousarray(images, dtype=self._dtype(self.input_name))
        shape = tuple(x.shape)
        if not self.context.set_input_shape(self.input_name, shape):
            raise RuntimeErrorWithFix(f"{self.path}: input shape {shape} is outside the engine's optimization profile "
                                      f"{tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))}")
        outs = {}
        moved = self._in.ensure(x.nbytes)
        for name, buf in self._outs.items():
            out_shape = tuple(self.context.get_tensor_shape(name))
            out_dtype = self._dtype(name)
            outs[name] = (out_shape, out_dtype, int(np.prod(out_shape)) * np.dtype(out_dtype).itemsize)
            moved |= buf.ensure(outs[name][2])
        if moved:
            self._drop_graphs()
        self._in.host_array(shape, x.dtype)[...] = x
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda_check(cudart.cudaMemcpyAsync(self._in.device, self._in.host, x.nbytes, h2d, self._stream), "input copy")
        self.context.set_tensor_address(self.input_name, int(self._in.device))
        for name, buf in self._outs.items():
            self.context.set_tensor_address(name, int(buf.device))
        if self.cuda_graph:
            graph = self._graphs.get(shape)
            if graph is None:
                graph = self._graphs[shape] = self._capture()
            _cuda_check(cudart.cudaGraphLaunch(graph, self._stream), "cudaGraphLaunch")
        elif not self.context.execute_async_v3(self._stream):
            raise RuntimeErrorWithFix(f"TensorRT execution of {self.path} failed (see the TensorRT log above)")
        for name, buf in self._outs.items():
            _cuda_check(cudart.cudaMemcpyAsync(buf.host, buf.device, outs[name][2], d2h, self._stream), "output copy")
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        # copies (astype): the pinned buffers are reused
        arrays = [self._outs[n].host_array(*outs[n][:2]).astype(np.float32) for n in self.output_tensors]
        return self._named(arrays, self.output_tensors)

    def _capture(self):
        """Capture one enqueue of the current shape into an executable CUDA graph."""
        from cuda.bindings import runtime as cudart

        # a first enqueue outside capture lets TensorRT finish shape-dependent setup and lazy allocations
        if not self.context.execute_async_v3(self._stream):
            raise RuntimeErrorWithFix(f"TensorRT execution of {self.path} failed before CUDA graph capture")
        _cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _cuda_check(cudart.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
        ok = self.context.execute_async_v3(self._stream)
        graph = _cuda_check(cudart.cudaStreamEndCapture(self._stream), "cudaStreamEndCapture")
        if not ok:
            raise RuntimeErrorWithFix(f"{self.path}: enqueue failed during CUDA graph capture; run without cuda_graph")
        exe = _cuda_check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        cudart.cudaGraphDestroy(graph)
        return exe

    def _drop_graphs(self) -> None:
        from cuda.bindings import runtime as cudart

        for exe in self._graphs.values():
            cudart.cudaGraphExecDestroy(exe)
        self._graphs.clear()

    def close(self) -> None:
        if getattr(self, "_stream", None) is None:
            return
        from cuda.bindings import runtime as cudart

        cudart.cudaStreamSynchronize(self._stream)
        self._drop_graphs()
        self._in.free()
        for buf in self._outs.values():
            buf.free()
        cudart.cudaStreamDestroy(self._stream)
        self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def engine_metadata(path: Path) -> Dict[str, str]:
    """The ONNX metadata of the graph an engine was built from: ``model_<precision>.json`` beside
    ``model_<precision>.plan``, else only the preprocessing from ``preprocess.json`` (both written by
    cvig export), else nothing."""
    path = Path(path)
    for side in (path.with_suffix(".json"), path.parent / "preprocess.json"):
        if side.is_file():
            try:
                data = json.loads(side.read_text())
            except ValueError:
                raise RuntimeErrorWithFix(f"{side} (the metadata beside {path.name}) is not valid JSON; "
                                          "copy it again from the export folder") from None
            return data if side.name != "preprocess.json" else {"clustervig.preprocess": json.dumps(data)}
    return {}


def plugin_library_for(engine: Path, explicit: Optional[Path] = None) -> Optional[Path]:
    """The plugin library an engine needs: ``explicit``, else, for an engine of the plugin graph (its metadata
    lists ``clustervig.plugins``), the one ``cvig build-plugins`` recorded (``$CVIG_PLUGINS_LIB`` first); None for
    an engine without plugins. An engine of the plugin graph with no library found is an error naming the fix."""
    from clustervig.plugins import locations

    if explicit is not None:
        return Path(explicit)
    if "clustervig.plugins" not in engine_metadata(Path(engine)):
        return None
    found = locations.plugin_library()
    if found is None:
        raise RuntimeErrorWithFix(f"{engine} is an engine of the plugin graph and needs libcvig_plugins.so: run "
                                  "`cvig build-plugins` once on this machine, or pass plugin_library=/--plugins-lib")
    return found


def open_session(path, providers: Optional[Sequence[str]] = None, plugin_library: Optional[Path] = None,
                 cuda_graph: bool = False) -> Session:
    """Open an exported model for inference; the backend follows the file's suffix.

    Args:
        path: ``.onnx`` (ONNX Runtime; a plugin graph runs its ``Cvig*`` nodes on the host kernels) or
            ``.plan`` / ``.engine`` / ``.trt`` (a TensorRT engine; needs ``tensorrt`` and ``cuda-python``, and
            finds its metadata in ``model_<precision>.json`` / ``preprocess.json`` beside it).
        providers: ONNX Runtime execution providers (default: the CPU provider), e.g.
            ``["CUDAExecutionProvider"]``.
        plugin_library: ``libcvig_plugins.so`` for an engine of the plugin graph (default: the one
            ``cvig build-plugins`` recorded on this machine).
        cuda_graph: TensorRT: capture each input shape's enqueue into a CUDA graph and replay it.

    Returns:
        A :class:`Session`: ``infer(images)`` takes float32 ``[B, 3, H, W]`` images preprocessed as
        ``session.preprocess`` says and returns float32 logits ``[B, classes]`` (a backbone: ``{name: float32
        [B, C, h, w]}``, ``session.outputs``); larger batches than the model
        takes are run in chunks. Use it as a context manager.

    Raises:
        RuntimeErrorWithFix: a missing, unreadable or unsupported file, a missing runtime or provider; the
            message names the file and the fix.

    Example::

        with open_session("out/model_fp32.onnx") as s:
            logits = s.infer(images)          # images: np.float32 [B, 3, 224, 224]
    """
    path = Path(path)
    if path.suffix in (".plan", ".engine", ".trt"):
        return TrtSession(path, plugin_library, cuda_graph)
    if path.suffix == ".onnx":
        return OrtSession(path, providers)
    raise RuntimeErrorWithFix(f"{path}: unknown model type '{path.suffix}'; give an .onnx file or a .plan/.engine")
