"""One-layer ONNX graphs of each TensorRT plugin, for ``cvig doctor``: a single ``Cvig*`` node exactly as
the plugin graph writes it (domain ``cvig``, ``plugin_version`` "1", ``plugin_namespace`` ""), its inputs,
and what the host kernels return for them. On a TensorRT machine each graph becomes an engine whose
outputs must equal the host kernels' bit for bit; on any machine the FP32 graphs run in ONNX Runtime on
the host kernels (the CPU plugin graph's ops), which checks the graphs themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper

B, N, C, KAPPA, ITERS, K = 2, 64, 16, 4, 10, 9
DOMAIN = "cvig"
ATTRS = {"plugin_version": "1", "plugin_namespace": ""}


def _tokens(seed: int, dtype) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((B, N, C))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def _centred(seed: int, dtype) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((B, N, C)) * 2.0 + 0.5
    return (x - x.mean(axis=1, keepdims=True)).astype(dtype)


@dataclass
class LayerCase:
    op: str
    attrs: Dict[str, int]
    inputs: Sequence[Tuple[str, str]]    # (name, "x" for the float tokens or "int32")
    outputs: Sequence[Tuple[str, str]]   # (name, "x" for the tokens' type or "int32")
    shapes: Dict[str, Tuple[int, ...]]
    host: Callable                       # (feed, kernels module, lib) -> outputs in `outputs` order
    make_x: Callable                     # (dtype) -> tokens

    def graph(self, dtype) -> onnx.ModelProto:
        xt = TensorProto.FLOAT if np.dtype(dtype) == np.float32 else TensorProto.FLOAT16
        elem = lambda kind: xt if kind == "x" else TensorProto.INT32  # noqa: E731
        node = helper.make_node(self.op, [n for n, _ in self.inputs], [n for n, _ in self.outputs],
                                name=f"{self.op}_0", domain=DOMAIN, **self.attrs, **ATTRS)
        g = helper.make_graph([node], f"{self.op}_layer",
                              [helper.make_tensor_value_info(n, elem(k), self.shapes[n]) for n, k in self.inputs],
                              [helper.make_tensor_value_info(n, elem(k), self.shapes[n]) for n, k in self.outputs])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                                  producer_name="clustervig-trt doctor")
        model.ir_version = 8
        return model

    def feed(self, dtype, lib) -> Dict[str, np.ndarray]:
        from ..plugins import kernels

        x = self.make_x(dtype)
        feed = {"x": x}
        names = [n for n, _ in self.inputs]
        if "labels" in names:
            feed["labels"] = kernels.kmeans(_tokens(0, np.float32), KAPPA, ITERS, lib=lib)[0]
        if "idx" in names:
            feed["idx"] = np.random.default_rng(3).integers(0, N, (B, N, K)).astype(np.int32)
        return feed

    def run_host(self, dtype, lib) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """The inputs and the host kernels' outputs for them, by output name."""
        from ..plugins import kernels

        feed = self.feed(dtype, lib)
        outs = self.host(feed, kernels, lib)
        return feed, {n: np.ascontiguousarray(o) for (n, _), o in zip(self.outputs, outs)}


def cases() -> List[LayerCase]:
    bn, bk, bnk = (B, N), (B, KAPPA), (B, N, K)
    return [
        LayerCase("CvigKMeans", {"clusters": KAPPA, "iters": ITERS}, [("x", "x")], [("labels", "int32"), ("counts", "int32")],
                  {"x": (B, N, C), "labels": bn, "counts": bk},
                  lambda f, K_, lib: K_.kmeans(f["x"], KAPPA, ITERS, lib=lib), lambda dt: _tokens(0, dt)),
        LayerCase("CvigKMeansCentroids", {"clusters": KAPPA, "iters": ITERS, "empty_zero": 1}, [("x", "x")],
                  [("labels", "int32"), ("counts", "int32"), ("centroids", "x")],
                  {"x": (B, N, C), "labels": bn, "counts": bk, "centroids": (B, KAPPA, C)},
                  lambda f, K_, lib: K_.kmeans_centroids(f["x"], KAPPA, ITERS, True, lib=lib), lambda dt: _centred(1, dt)),
        LayerCase("CvigPartitionedKNN", {"k": K}, [("x", "x"), ("labels", "int32")], [("idx", "int32"), ("valid", "int32")],
                  {"x": (B, N, C), "labels": bn, "idx": bnk, "valid": bnk},
                  lambda f, K_, lib: K_.partitioned_knn(f["x"], f["labels"], K, lib=lib), lambda dt: _tokens(0, dt)),
        LayerCase("CvigSegmentMean", {"clusters": KAPPA}, [("x", "x"), ("labels", "int32")],
                  [("z", "x"), ("counts", "int32")], {"x": (B, N, C), "labels": bn, "z": (B, KAPPA, C), "counts": bk},
                  lambda f, K_, lib: K_.segment_mean(f["x"], f["labels"], KAPPA, lib=lib), lambda dt: _centred(2, dt)),
        LayerCase("CvigGatherMaxRel", {}, [("x", "x"), ("idx", "int32")], [("out", "x")],
                  {"x": (B, N, C), "idx": bnk, "out": (B, N, C)},
                  lambda f, K_, lib: (K_.gather_max_rel(f["x"], f["idx"], lib=lib),), lambda dt: _centred(4, dt)),
    ]


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_tensorrt(trt, onnx_path: Path, plugin_library: Path, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Build a strongly typed engine of the one-layer graph with the plugin library and run it once."""
    from ..export.compare import trt_runner
    from ..export.trt_build import build_engine

    plan = onnx_path.with_suffix(".plan")
    build_engine(onnx_path, plan, plugin_library=plugin_library)
    runner = trt_runner(plan, plugin_library)
    with runner:
        out = runner.infer(feed)
    return {k: np.asarray(v) for k, v in out.items()}
