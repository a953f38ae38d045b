"""ctypes access to libcvig_kernels.so on PyTorch CUDA tensors (tests and benchmarks)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional, Tuple

STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported size", 3: "CUDA error"}
ENV = "CVIG_KERNELS_LIB"


class KernelLibraryError(RuntimeError):
    pass


def find_library(path: Optional[str] = None) -> Path:
    candidates = [path, os.environ.get(ENV)]
    root = Path(__file__).resolve().parents[2]
    candidates += [str(root / "build" / "plugins" / "libcvig_kernels.so")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise KernelLibraryError(
        "libcvig_kernels.so not found: build it with `cmake -S plugins -B build/plugins && cmake --build build/plugins` "
        f"or point {ENV} at it"
    )


class Kernels:
    def __init__(self, path: Optional[str] = None) -> None:
        self.path = find_library(path)
        self.lib = ctypes.CDLL(str(self.path))
        p, i = ctypes.c_void_p, ctypes.c_int
        self.lib.cvig_kmeans_launch.argtypes = [p, i, i, i, i, i, i, p, p, p]
        self.lib.cvig_partitioned_knn_launch.argtypes = [p, p, i, i, i, i, i, p, p, p]
        self.lib.cvig_segment_mean_launch.argtypes = [p, p, i, i, i, i, i, p, p, p]
        self.lib.cvig_gather_max_rel_launch.argtypes = [p, p, i, i, i, i, i, p, p]

    @staticmethod
    def _dtype(t) -> int:
        import torch

        if t.dtype == torch.float32:
            return 0
        if t.dtype == torch.float16:
            return 1
        raise KernelLibraryError(f"unsupported dtype {t.dtype}")

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise KernelLibraryError(f"{what} failed: {STATUS.get(code, code)}")

    @staticmethod
    def _stream():
        import torch

        return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def kmeans(self, xn, k: int, iters: int) -> Tuple:
        import torch

        b, n, c = xn.shape
        xn = xn.contiguous()
        labels = torch.empty(b, n, dtype=torch.int32, device=xn.device)
        counts = torch.empty(b, k, dtype=torch.int32, device=xn.device)
        self._check(self.lib.cvig_kmeans_launch(xn.data_ptr(), self._dtype(xn), b, n, c, k, iters, labels.data_ptr(),
                                                counts.data_ptr(), self._stream()), "k-means")
        return labels, counts

    def partitioned_knn(self, xn, labels, k: int) -> Tuple:
        import torch

        b, n, c = xn.shape
        xn, labels = xn.contiguous(), labels.to(torch.int32).contiguous()
        idx = torch.empty(b, n, k, dtype=torch.int32, device=xn.device)
        valid = torch.empty_like(idx)
        self._check(self.lib.cvig_partitioned_knn_launch(xn.data_ptr(), labels.data_ptr(), self._dtype(xn), b, n, c, k,
                                                         idx.data_ptr(), valid.data_ptr(), self._stream()), "k-NN")
        return idx, valid

    def segment_mean(self, x, labels, k: int) -> Tuple:
        import torch

        b, n, c = x.shape
        x, labels = x.contiguous(), labels.to(torch.int32).contiguous()
        z = torch.empty(b, k, c, dtype=x.dtype, device=x.device)
        counts = torch.empty(b, k, dtype=torch.int32, device=x.device)
        self._check(self.lib.cvig_segment_mean_launch(x.data_ptr(), labels.data_ptr(), self._dtype(x), b, n, c, k,
                                                      z.data_ptr(), counts.data_ptr(), self._stream()), "segment mean")
        return z, counts

    def gather_max_rel(self, x, idx):
        import torch

        b, n, c = x.shape
        x, idx = x.contiguous(), idx.to(torch.int32).contiguous()
        out = torch.empty_like(x)
        self._check(self.lib.cvig_gather_max_rel_launch(x.data_ptr(), idx.data_ptr(), self._dtype(x), b, n, c,
                                                        idx.shape[-1], out.data_ptr(), self._stream()), "gather-max-rel")
        return out
