"""The plugin kernels outside TensorRT, through their C ABI (``plugins/common/cvig_kernels.h``).

Two libraries implement that ABI from one source (docs/design.md, "Kernels"):

* ``libcvig_kernels_host.so``: the kernels compiled for the host CPU by the host
  compiler alone. Found through ``CVIG_KERNELS_HOST_LIB``; an installed wheel
  carries it prebuilt (``clustervig/plugins/lib/``); in a checkout it is built on
  first use from ``plugins/`` (a few seconds, cached per source digest under
  ``build/kernels-host/``, or ``~/.cache/clustervig/`` when that is not writable).
* ``libcvig_kernels.so``: the CUDA kernels, found through ``CVIG_KERNELS_LIB``,
  where ``cvig build-plugins`` recorded it (:mod:`clustervig.plugins.locations`),
  or in a checkout's ``build/plugins/`` (``cmake -S plugins -B build/plugins``).

Front ends: numpy functions on the host library (:func:`kmeans`,
:func:`kmeans_centroids`, :func:`partitioned_knn`, :func:`segment_mean`, :func:`gather_max_rel`), used by
the ONNX Runtime ops of the CPU plugin graph; and :class:`Kernels`, which takes
PyTorch tensors and runs CPU tensors on the host library and CUDA tensors on
the CUDA library (the PyTorch custom ops of ``clustervig.plugins.torch_ops``).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import hostbuild, locations

STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported size", 3: "CUDA error"}
ENV = "CVIG_KERNELS_LIB"  # CUDA library
ENV_HOST = "CVIG_KERNELS_HOST_LIB"
ENV_CACHE = "CVIG_KERNELS_CACHE"
FP32, FP16 = 0, 1
MAX_K = 64  # CVIG_MAX_K
HOST_SMEM_LIMIT = 227 * 1024  # CVIG_HOST_SMEM_LIMIT

PLUGINS = hostbuild.plugins_dir()  # the kernel sources: the installed package folder, or a checkout's plugins/
INSTALLED = PLUGINS == Path(__file__).resolve().parent
ROOT = PLUGINS.parent  # a checkout's root (only meaningful when not INSTALLED)
PACKAGED_HOST = PLUGINS / "lib" / hostbuild.LIBRARY  # prebuilt by the wheel build (setup.py)
HOST_SOURCES, HOST_FLAGS = hostbuild.HOST_SOURCES, hostbuild.HOST_FLAGS


class KernelLibraryError(RuntimeError):
    """A kernel library is missing, cannot be built or loaded, or a launcher returned an error."""


# ----------------------------------------------------------------------------
# Finding and building the libraries
# ----------------------------------------------------------------------------


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) of every source the host library is built from, with the flags."""
    return hostbuild.source_digest(PLUGINS)


def _cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    if not INSTALLED:
        repo_build = ROOT / "build" / "kernels-host"
        try:
            repo_build.mkdir(parents=True, exist_ok=True)
            if os.access(repo_build, os.W_OK):
                return repo_build
        except OSError:
            pass
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clustervig" / "kernels-host"


def _compiler() -> str:
    found = hostbuild.find_compiler()
    if found:
        return found
    raise KernelLibraryError(
        "no C++ compiler found to build libcvig_kernels_host.so: install g++ (or set CXX), "
        f"or point {ENV_HOST} at a library built with `cmake -S plugins -B build/plugins && cmake --build build/plugins`"
    )


def build_host_library(dest: Optional[Path] = None, quiet: bool = False) -> Path:
    """Compile ``libcvig_kernels_host.so`` from the ``plugins/`` sources; returns its path.

    The file is named after the sources' digest, so a changed source never
    loads a stale library; concurrent builds are serialised by a lock file and
    the library appears atomically.
    """
    if not (PLUGINS / HOST_SOURCES[0]).is_file():
        raise KernelLibraryError(
            f"the kernel sources are not at {PLUGINS} (the package is incomplete: reinstall clustervig-trt, "
            f"or set {ENV_HOST} to a libcvig_kernels_host.so built with CMake)"
        )
    lib = (Path(dest) if dest is not None else _cache_dir()) / f"libcvig_kernels_host-{source_digest()}.so"

    def make(_work: Path, out: Path) -> None:
        if not quiet:
            print(f"[cvig] building {lib.name} from {PLUGINS} (one time, a few seconds)", file=sys.stderr, flush=True)
        try:
            hostbuild.compile_host_library(PLUGINS, out, _compiler())
        except RuntimeError as exc:
            raise KernelLibraryError(str(exc)) from None

    return hostbuild.build_once(lib, make)


def packaged_host_library() -> Optional[Path]:
    """The wheel's prebuilt host library, when it was built from exactly the sources beside it."""
    record = PACKAGED_HOST.with_suffix(".json")
    if not (PACKAGED_HOST.is_file() and record.is_file()):
        return None
    try:
        built_from = json.loads(record.read_text()).get("source_digest")
    except (OSError, ValueError):
        return None
    return PACKAGED_HOST if built_from == source_digest() else None


def find_host_library(path: Optional[str] = None, build: bool = True) -> Path:
    """The host library: ``path``, else ``$CVIG_KERNELS_HOST_LIB``, else the installed package's prebuilt one,
    else the cached build of the current sources (built now if ``build``)."""
    for p in (path, os.environ.get(ENV_HOST)):
        if p:
            if not Path(p).is_file():
                raise KernelLibraryError(f"host kernel library {p} does not exist")
            return Path(p)
    packaged = packaged_host_library()
    if packaged is not None:
        return packaged
    lib = _cache_dir() / f"libcvig_kernels_host-{source_digest()}.so"
    if lib.is_file():
        return lib
    if not build:
        raise KernelLibraryError(f"{lib} is not built yet (clustervig.plugins.kernels.build_host_library())")
    return build_host_library()


def find_library(path: Optional[str] = None) -> Path:
    """The CUDA library: ``path``, else ``$CVIG_KERNELS_LIB``, else where ``cvig build-plugins`` recorded it,
    else ``build/plugins/`` or ``build/`` of a checkout."""
    candidates = [path, os.environ.get(ENV), locations.recorded("kernels")]
    if not INSTALLED:
        candidates += [ROOT / "build" / "plugins" / "libcvig_kernels.so", ROOT / "build" / "libcvig_kernels.so"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise KernelLibraryError(
        "libcvig_kernels.so (CUDA) not found: run `cvig build-plugins` (needs nvcc), or point "
        f"{ENV} at a library built with `cmake -S plugins -B build/plugins && cmake --build build/plugins -j`"
    )


# ----------------------------------------------------------------------------
# ctypes binding of one library
# ----------------------------------------------------------------------------


class KernelLibrary:
    """One loaded implementation of the C ABI; every call checks the returned status."""

    def __init__(self, path: Path, backend: str) -> None:
        self.path = Path(path)
        try:
            self.lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelLibraryError(f"cannot load {self.path}: {exc}") from None
        try:
            self.lib.cvig_kernels_backend.restype = ctypes.c_char_p
            self.backend = self.lib.cvig_kernels_backend().decode()
        except AttributeError:
            raise KernelLibraryError(f"{self.path} is not a ClusterViG kernel library (no cvig_kernels_backend)") from None
        if self.backend != backend:
            raise KernelLibraryError(f"{self.path} holds the {self.backend!r} kernels, expected {backend!r}")
        p, i = ctypes.c_void_p, ctypes.c_int
        self.lib.cvig_kmeans_launch.argtypes = [p, i, i, i, i, i, i, p, p, p]
        self.lib.cvig_kmeans_centroids_launch.argtypes = [p, i, i, i, i, i, i, i, p, p, p, p]
        self.lib.cvig_partitioned_knn_launch.argtypes = [p, p, i, i, i, i, i, p, p, p]
        self.lib.cvig_segment_mean_launch.argtypes = [p, p, i, i, i, i, i, p, p, p]
        self.lib.cvig_gather_max_rel_launch.argtypes = [p, p, i, i, i, i, i, p, p]
        self.lib.cvig_kmeans_smem_bytes.argtypes = [i, i, i]
        self.lib.cvig_kmeans_smem_bytes.restype = ctypes.c_size_t
        for name in ("cvig_kmeans_launch", "cvig_kmeans_centroids_launch", "cvig_partitioned_knn_launch", "cvig_segment_mean_launch",
                     "cvig_gather_max_rel_launch"):
            getattr(self.lib, name).restype = ctypes.c_int

    def call(self, what: str, name: str, *args) -> None:
        code = getattr(self.lib, name)(*args)
        if code != 0:
            hint = {1: " (null pointer, a size <= 0, k > N or an unknown dtype)",
                    2: f" (k-NN K above {MAX_K}, or a k-means working set above the shared memory of one block)",
                    3: " (the CUDA launch failed: see cudaGetLastError)"}.get(code, "")
            raise KernelLibraryError(f"{what} failed: {STATUS.get(code, code)}{hint}")

    def kmeans_smem_bytes(self, n: int, c: int, k: int) -> int:
        return int(self.lib.cvig_kmeans_smem_bytes(n, c, k))


_LIBS = {}
_LOCK = threading.Lock()


def host_library(path: Optional[str] = None) -> KernelLibrary:
    """The host library, loaded once per path (built from the sources if needed)."""
    p = find_host_library(path)
    with _LOCK:
        if p not in _LIBS:
            _LIBS[p] = KernelLibrary(p, "host")
        return _LIBS[p]


def cuda_library(path: Optional[str] = None) -> KernelLibrary:
    p = find_library(path)
    with _LOCK:
        if p not in _LIBS:
            _LIBS[p] = KernelLibrary(p, "cuda")
        return _LIBS[p]


# ----------------------------------------------------------------------------
# Shape checks shared by the front ends
# ----------------------------------------------------------------------------


def _dims3(shape, what: str) -> Tuple[int, int, int]:
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"{what} must be [B, N, C] with every size > 0, got {list(shape)}")
    return tuple(int(s) for s in shape)


def _check_index(shape, expect, what: str) -> None:
    if tuple(shape) != tuple(expect):
        raise ValueError(f"{what} must have shape {list(expect)}, got {list(shape)}")


def _check_kmeans(n: int, k: int, iters: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k-means clusters must be in 1..N = {n}, got {k}")
    if iters < 0:
        raise ValueError(f"k-means iterations must be >= 0, got {iters}")


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k-NN K must be in 1..{MAX_K} (the kernel's register budget), got {k}")


# ----------------------------------------------------------------------------
# numpy front end (host library)
# ----------------------------------------------------------------------------


def _np_float(x: np.ndarray, what: str) -> Tuple[np.ndarray, int]:
    x = np.asarray(x)
    if x.dtype == np.float32:
        return np.ascontiguousarray(x), FP32
    if x.dtype == np.float16:
        return np.ascontiguousarray(x), FP16
    raise TypeError(f"{what} must be float32 or float16, got {x.dtype}")


def _np_int32(a, what: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int32)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def kmeans(xn: np.ndarray, k: int, iters: int, lib: Optional[KernelLibrary] = None) -> Tuple[np.ndarray, np.ndarray]:
    """k-means of normalised tokens ``xn [B, N, C]`` -> ``(labels [B, N], counts [B, k])`` int32 (host kernels)."""
    xn, dt = _np_float(xn, "xn")
    b, n, c = _dims3(xn.shape, "xn")
    _check_kmeans(n, k, iters)
    lib = lib or host_library()
    labels = np.empty((b, n), np.int32)
    counts = np.empty((b, k), np.int32)
    lib.call("k-means", "cvig_kmeans_launch", _ptr(xn), dt, b, n, c, k, iters, _ptr(labels), _ptr(counts), None)
    return labels, counts


def kmeans_centroids(x: np.ndarray, k: int, iters: int, empty_zero: bool = True,
                     lib: Optional[KernelLibrary] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means of tokens ``x [B, N, C]`` with its centroids -> ``(labels [B, N], counts [B, k])`` int32 and
    ``centroids [B, k, C]`` in x's dtype (host kernels). ``empty_zero``: an empty cluster's centroid becomes 0."""
    x, dt = _np_float(x, "x")
    b, n, c = _dims3(x.shape, "x")
    _check_kmeans(n, k, iters)
    lib = lib or host_library()
    labels = np.empty((b, n), np.int32)
    counts = np.empty((b, k), np.int32)
    cent = np.empty((b, k, c), x.dtype)
    lib.call("k-means", "cvig_kmeans_centroids_launch", _ptr(x), dt, b, n, c, k, iters, int(bool(empty_zero)),
             _ptr(labels), _ptr(counts), _ptr(cent), None)
    return labels, counts, cent


def partitioned_knn(xn: np.ndarray, labels: np.ndarray, k: int,
                    lib: Optional[KernelLibrary] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Partitioned k-NN -> ``(idx [B, N, K], valid [B, N, K])`` int32 (host kernels)."""
    xn, dt = _np_float(xn, "xn")
    b, n, c = _dims3(xn.shape, "xn")
    labels = _np_int32(labels, "labels")
    _check_index(labels.shape, (b, n), "labels")
    _check_k(k)
    lib = lib or host_library()
    idx = np.empty((b, n, k), np.int32)
    valid = np.empty((b, n, k), np.int32)
    lib.call("k-NN", "cvig_partitioned_knn_launch", _ptr(xn), _ptr(labels), dt, b, n, c, k, _ptr(idx), _ptr(valid), None)
    return idx, valid


def segment_mean(x: np.ndarray, labels: np.ndarray, k: int,
                 lib: Optional[KernelLibrary] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-partition mean -> ``(z [B, k, C]`` in x's dtype, ``counts [B, k]`` int32) (host kernels)."""
    x, dt = _np_float(x, "x")
    b, n, c = _dims3(x.shape, "x")
    labels = _np_int32(labels, "labels")
    _check_index(labels.shape, (b, n), "labels")
    if k < 1:
        raise ValueError(f"clusters must be >= 1, got {k}")
    lib = lib or host_library()
    z = np.empty((b, k, c), x.dtype)
    counts = np.empty((b, k), np.int32)
    lib.call("segment mean", "cvig_segment_mean_launch", _ptr(x), _ptr(labels), dt, b, n, c, k, _ptr(z), _ptr(counts), None)
    return z, counts


def gather_max_rel(x: np.ndarray, idx: np.ndarray, lib: Optional[KernelLibrary] = None) -> np.ndarray:
    """``max_k x[idx[b, v, k]] - x[b, v]`` for ``x [B, N, C]``, ``idx [B, N, K]`` (host kernels)."""
    x, dt = _np_float(x, "x")
    b, n, c = _dims3(x.shape, "x")
    idx = _np_int32(idx, "idx")
    if idx.ndim != 3 or idx.shape[:2] != (b, n) or idx.shape[2] < 1:
        raise ValueError(f"idx must be [B, N, K] = [{b}, {n}, K >= 1], got {list(idx.shape)}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx holds token indices outside 0..{n - 1}")
    lib = lib or host_library()
    out = np.empty_like(x)
    lib.call("gather-max-rel", "cvig_gather_max_rel_launch", _ptr(x), _ptr(idx), dt, b, n, c, idx.shape[2], _ptr(out), None)
    return out


# ----------------------------------------------------------------------------
# PyTorch front end: CPU tensors -> host library, CUDA tensors -> CUDA library
# ----------------------------------------------------------------------------


class Kernels:
    """The kernels on PyTorch tensors, on the device the tensors live on.

    ``Kernels()`` loads the host library for CPU tensors and the CUDA library
    (on first use) for CUDA tensors; ``path``/``host_path`` pick explicit files.
    CUDA launches go on the current stream and do not synchronise.
    """

    def __init__(self, path: Optional[str] = None, host_path: Optional[str] = None) -> None:
        self._path, self._host_path = path, host_path
        if path is not None:  # an explicit CUDA library is checked now
            cuda_library(path)

    def library(self, device) -> KernelLibrary:
        if device.type == "cpu":
            return host_library(self._host_path)
        if device.type == "cuda":
            return cuda_library(self._path)
        raise KernelLibraryError(f"no kernels for {device.type} tensors (CPU and CUDA only)")

    @staticmethod
    def _dtype(t) -> int:
        import torch

        if t.dtype == torch.float32:
            return FP32
        if t.dtype == torch.float16:
            return FP16
        raise TypeError(f"the kernels take float32 or float16 tensors, got {t.dtype}")

    @staticmethod
    def _stream(t):
        if t.device.type != "cuda":
            return None
        import torch

        return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)

    @staticmethod
    def _same_device(*ts) -> None:
        devs = {t.device for t in ts}
        if len(devs) != 1:
            raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")

    def _run(self, t, what, name, *args):
        import torch

        lib = self.library(t.device)
        if t.device.type == "cuda":
            with torch.cuda.device(t.device):
                lib.call(what, name, *args, self._stream(t))
        else:
            lib.call(what, name, *args, None)

    def kmeans(self, xn, k: int, iters: int):
        import torch

        b, n, c = _dims3(xn.shape, "xn")
        _check_kmeans(n, k, iters)
        xn = xn.detach().contiguous()
        labels = torch.empty(b, n, dtype=torch.int32, device=xn.device)
        counts = torch.empty(b, k, dtype=torch.int32, device=xn.device)
        self._run(xn, "k-means", "cvig_kmeans_launch", xn.data_ptr(), self._dtype(xn), b, n, c, k, iters,
                  labels.data_ptr(), counts.data_ptr())
        return labels, counts

    def kmeans_centroids(self, x, k: int, iters: int, empty_zero: bool = True):
        import torch

        b, n, c = _dims3(x.shape, "x")
        _check_kmeans(n, k, iters)
        x = x.detach().contiguous()
        labels = torch.empty(b, n, dtype=torch.int32, device=x.device)
        counts = torch.empty(b, k, dtype=torch.int32, device=x.device)
        cent = torch.empty(b, k, c, dtype=x.dtype, device=x.device)
        self._run(x, "k-means", "cvig_kmeans_centroids_launch", x.data_ptr(), self._dtype(x), b, n, c, k, iters,
                  int(bool(empty_zero)), labels.data_ptr(), counts.data_ptr(), cent.data_ptr())
        return labels, counts, cent

    def partitioned_knn(self, xn, labels, k: int):
        import torch

        b, n, c = _dims3(xn.shape, "xn")
        _check_index(labels.shape, (b, n), "labels")
        _check_k(k)
        self._same_device(xn, labels)
        xn, labels = xn.detach().contiguous(), labels.to(torch.int32).contiguous()
        idx = torch.empty(b, n, k, dtype=torch.int32, device=xn.device)
        valid = torch.empty_like(idx)
        self._run(xn, "k-NN", "cvig_partitioned_knn_launch", xn.data_ptr(), labels.data_ptr(), self._dtype(xn), b, n, c,
                  k, idx.data_ptr(), valid.data_ptr())
        return idx, valid

    def segment_mean(self, x, labels, k: int):
        import torch

        b, n, c = _dims3(x.shape, "x")
        _check_index(labels.shape, (b, n), "labels")
        self._same_device(x, labels)
        if k < 1:
            raise ValueError(f"clusters must be >= 1, got {k}")
        x, labels = x.detach().contiguous(), labels.to(torch.int32).contiguous()
        z = torch.empty(b, k, c, dtype=x.dtype, device=x.device)
        counts = torch.empty(b, k, dtype=torch.int32, device=x.device)
        self._run(x, "segment mean", "cvig_segment_mean_launch", x.data_ptr(), labels.data_ptr(), self._dtype(x), b, n,
                  c, k, z.data_ptr(), counts.data_ptr())
        return z, counts

    def gather_max_rel(self, x, idx):
        import torch

        b, n, c = _dims3(x.shape, "x")
        if idx.ndim != 3 or tuple(idx.shape[:2]) != (b, n) or idx.shape[2] < 1:
            raise ValueError(f"idx must be [B, N, K] = [{b}, {n}, K >= 1], got {list(idx.shape)}")
        self._same_device(x, idx)
        if x.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"idx holds token indices outside 0..{n - 1}")  # checked on CPU only: no device sync
        x, idx = x.detach().contiguous(), idx.to(torch.int32).contiguous()
        out = torch.empty_like(x)
        self._run(x, "gather-max-rel", "cvig_gather_max_rel_launch", x.data_ptr(), idx.data_ptr(), self._dtype(x), b, n,
                  c, idx.shape[-1], out.data_ptr())
        return out
