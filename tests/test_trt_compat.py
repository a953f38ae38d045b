"""export.trt_compat: each TensorRT limit on a hand-built graph, and no false positive on the real graphs.

Every hand-built graph below is one that TensorRT (or our plugins) refuses and that the
check missed before it learnt the rule (docs/tensorrt.md section 5).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP, helper, numpy_helper

import clustervig
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.trt_compat import (SMEM_OPTIN_LIMITS, TOPK_MAX_K, check_tensorrt_ops, kmeans_smem_bytes,
                                           tensorrt_op_issues, tensorrt_op_warnings)


def model(nodes, inputs, outputs, inits=(), opset=17, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops)


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def only(issues, text):
    assert len(issues) == 1 and text in issues[0], issues


# --- TopK ------------------------------------------------------------------


def topk_graph(n: int, batch="batch", k_from_shape=True):
    """TopK over all N tokens with K = Shape(x)[1] (the old padded layout's argsort)."""
    x = vi("x", TP.FLOAT, [batch, n])
    if k_from_shape:
        nodes = [helper.make_node("Shape", ["x"], ["s"]),
                 helper.make_node("Gather", ["s", "one"], ["k0"], axis=0),
                 helper.make_node("Unsqueeze", ["k0", "ax0"], ["k"]),
                 helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)]
        inits = [const("one", np.array(1, np.int64)), const("ax0", np.array([0], np.int64))]
    else:
        nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)]
        inits = [const("k", np.array([n], np.int64))]
    return model(nodes, [x], [vi("v", TP.FLOAT, None), vi("i", TP.INT64, None)], inits)


@pytest.mark.parametrize("batch", ["batch", 2])
def test_topk_k_folded_from_shape_chain(batch):
    n = 62 * 62  # 3844 > 3840: the grid at which the old padded layout failed
    only(tensorrt_op_issues(topk_graph(n, batch)), f"K = {n} > {TOPK_MAX_K}")
    assert tensorrt_op_issues(topk_graph(60 * 60, batch)) == []
    only(tensorrt_op_issues(topk_graph(n, batch, k_from_shape=False)), f"K = {n}")


def test_topk_unknown_k_bounded_by_axis_length():
    n = 4000
    x = vi("x", TP.FLOAT, [1, n])
    g = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
              [x, vi("k", TP.INT64, [1])], [vi("v", TP.FLOAT, None), vi("i", TP.INT64, None)])
    assert tensorrt_op_issues(g) == []
    only(tensorrt_op_warnings(g), "not known statically")


def test_topk_int64_values_and_argmax_are_supported_but_bool_is_not():
    # operators.md (10.1-GA): TopK / ArgMin / ArgMax take FP32, FP16, BF16, INT32, INT64
    for elem in (TP.INT64, TP.INT32, TP.FLOAT16):
        g = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1),
                   helper.make_node("ArgMax", ["x"], ["a"], axis=1)],
                  [vi("x", elem, [1, 8])], [vi("v", elem, None), vi("i", TP.INT64, None), vi("a", TP.INT64, None)],
                  [const("k", np.array([3], np.int64))])
        assert tensorrt_op_issues(g) == [], elem
    g = model([helper.make_node("ArgMin", ["x"], ["a"], axis=1)], [vi("x", TP.UINT8, [1, 8])],
              [vi("a", TP.INT64, None)])
    only(tensorrt_op_issues(g), "ArgMin on UINT8")


def test_topk_sorted_zero():
    g = model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, sorted=0)], [vi("x", TP.FLOAT, [1, 8])],
              [vi("v", TP.FLOAT, None), vi("i", TP.INT64, None)], [const("k", np.array([3], np.int64))])
    only(tensorrt_op_issues(g), "sorted=0")


# --- CumSum ----------------------------------------------------------------


@pytest.mark.parametrize("elem,bad", [(TP.INT64, True), (TP.INT32, True), (TP.FLOAT, False), (TP.FLOAT16, False)])
def test_cumsum_types(elem, bad):
    g = model([helper.make_node("CumSum", ["x", "ax"], ["y"])], [vi("x", elem, [2, 5])], [vi("y", elem, None)],
              [const("ax", np.array(1, np.int64))])
    issues = tensorrt_op_issues(g)
    if bad:
        only(issues, f"CumSum on {TP.DataType.Name(elem)}")
    else:
        assert issues == []


# --- axes given as tensors ---------------------------------------------------


@pytest.mark.parametrize("op", ["Unsqueeze", "Squeeze", "Slice"])
def test_axes_must_be_constant(op):
    # axes computed at run time (here: an input) instead of an initializer
    x = vi("x", TP.FLOAT, [1, 4, 1])
    axes = vi("axes", TP.INT64, [1])
    if op == "Slice":
        node = helper.make_node("Slice", ["x", "st", "en", "axes"], ["y"])
        inits = [const("st", np.array([0], np.int64)), const("en", np.array([2], np.int64))]
    else:
        node = helper.make_node(op, ["x", "axes"], ["y"])
        inits = []
    g = model([node], [x, axes], [vi("y", TP.FLOAT, None)], inits)
    only(tensorrt_op_issues(g), "axes must be")
    # the same axes as an initializer (or a Constant node) are fine
    g.graph.input.pop()
    g.graph.initializer.append(const("axes", np.array([2] if op != "Slice" else [1], np.int64)))
    assert tensorrt_op_issues(g) == []


# --- Q/DQ ------------------------------------------------------------------


def qdq_graph(scale, zero, scale_as_input=False):
    x = vi("x", TP.FLOAT, [1, 4])
    inits = [const("z", np.asarray(zero, np.int8))]
    inputs = [x]
    if scale_as_input:
        inputs.append(vi("s", TP.FLOAT, []))
    else:
        inits.append(const("s", np.asarray(scale, np.float32)))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    return model(nodes, inputs, [vi("y", TP.FLOAT, None)], inits)


def test_qdq_scale_and_zero_point():
    assert tensorrt_op_issues(qdq_graph(0.1, 0)) == []
    issues = tensorrt_op_issues(qdq_graph(0.0, 0))  # a dead activation calibrated to range 0
    assert len(issues) == 2 and all("scale must be > 0" in i for i in issues)
    issues = tensorrt_op_issues(qdq_graph(-0.5, 0))
    assert len(issues) == 2 and all("> 0" in i for i in issues)
    issues = tensorrt_op_issues(qdq_graph(0.1, 3))
    assert len(issues) == 2 and all("zero point must be 0" in i for i in issues)
    issues = tensorrt_op_issues(qdq_graph(0.1, 0, scale_as_input=True))
    assert len(issues) == 2 and all("build-time constant" in i for i in issues)


# --- plugin nodes ----------------------------------------------------------


def plugin_graph(op, n=196, c=32, **attrs):
    x = vi("x", TP.FLOAT, [1, n, c])
    kmeans = op.startswith("CvigKMeans")
    node = helper.make_node(op, ["x"] + (["lab"] if not kmeans else []), ["o1", "o2"], domain="cvig",
                            plugin_version="1", plugin_namespace="", **attrs)
    inputs = [x] + ([vi("lab", TP.INT32, [1, n])] if not kmeans else [])
    return model([node], inputs, [vi("o1", TP.INT32, None), vi("o2", TP.INT32, None)], domains=["cvig"])


@pytest.mark.parametrize("k,bad", [(0, True), (1, False), (64, False), (65, True)])
def test_plugin_knn_k(k, bad):
    issues = tensorrt_op_issues(plugin_graph("CvigPartitionedKNN", k=k))
    if bad:
        only(issues, f"k = {k} outside 1..64")
    else:
        assert issues == []


def test_plugin_kmeans_attributes():
    assert tensorrt_op_issues(plugin_graph("CvigKMeans", clusters=4, iters=20)) == []
    only(tensorrt_op_issues(plugin_graph("CvigKMeans", clusters=0, iters=20)), "clusters = 0 < 1")
    only(tensorrt_op_issues(plugin_graph("CvigKMeans", n=16, clusters=20, iters=20)), "clusters = 20 > N = 16")
    only(tensorrt_op_issues(plugin_graph("CvigKMeans", clusters=4, iters=-1)), "iters = -1 < 0")
    # the numerics="authors" variant: the same limits, and empty_zero a flag
    assert tensorrt_op_issues(plugin_graph("CvigKMeansCentroids", clusters=4, iters=20, empty_zero=1)) == []
    only(tensorrt_op_issues(plugin_graph("CvigKMeansCentroids", n=16, clusters=20, iters=20)), "clusters = 20 > N = 16")
    only(tensorrt_op_issues(plugin_graph("CvigKMeansCentroids", clusters=4, iters=20, empty_zero=2)),
         "empty_zero = 2 is not 0 or 1")
    huge = plugin_graph("CvigKMeansCentroids", n=16384, c=8192, clusters=6, iters=20)
    only(tensorrt_op_issues(huge), "exceeds every target's opt-in shared memory")


def test_plugin_kmeans_shared_memory():
    # cvig_args.h: (kappa*C + kappa)*4 + (2*kappa + 2*N)*4 bytes
    assert kmeans_smem_bytes(784, 640, 6) == (6 * 640 + 6) * 4 + (12 + 2 * 784) * 4 == 21704  # B-dagger
    small = plugin_graph("CvigKMeans", n=784, c=640, clusters=6, iters=20)
    assert check_tensorrt_ops(small) == []
    # 64 KiB: above the 48 KiB default, within every target's opt-in limit
    mid = plugin_graph("CvigKMeans", n=4096, c=2048, clusters=6, iters=20)
    need = kmeans_smem_bytes(4096, 2048, 6)
    assert 48 * 1024 < need <= min(SMEM_OPTIN_LIMITS.values())
    assert tensorrt_op_issues(mid) == []
    only(tensorrt_op_warnings(mid), "above the 48 KiB default")
    # 120 KiB: too large for the 99 KiB targets (warning naming them), fine on sm_80/sm_90/sm_100
    big = plugin_graph("CvigKMeans", n=4096, c=4096, clusters=6, iters=20)
    assert 99 * 1024 < kmeans_smem_bytes(4096, 4096, 6) <= 163 * 1024
    assert tensorrt_op_issues(big) == []
    only(tensorrt_op_warnings(big), "too large for sm_120, sm_86, sm_89")
    # above the largest opt-in limit (227 KiB): an error
    huge = plugin_graph("CvigKMeans", n=16384, c=8192, clusters=6, iters=20)
    assert kmeans_smem_bytes(16384, 8192, 6) > 227 * 1024
    only(tensorrt_op_issues(huge), "exceeds every target's opt-in shared memory")


# --- the real graphs -------------------------------------------------------


@pytest.fixture(scope="module")
def real_graphs(tmp_path_factory):
    from clustervig.calib import quantize_qdq
    from clustervig.export.fp16 import convert_fp16
    from clustervig.export.plugin_graph import to_plugin_graph

    d = tmp_path_factory.mktemp("real")
    out = {}
    for knn in ("masked", "padded"):
        torch.manual_seed(0)
        m = clustervig.create_model("cvig_nano", knn=knn).eval()
        export_onnx(m, d / f"{knn}.onnx", BatchSpec(1, 2, 4))
        g = onnx.load(str(d / f"{knn}.onnx"))
        out[f"{knn}-fp32"] = g
        out[f"{knn}-fp16"] = convert_fp16(g)
        if knn == "masked":
            out["plugins"] = to_plugin_graph(g)[0]
            convs = {n.input[0] for n in g.graph.node if n.op_type == "Conv"}
            out["int8"] = quantize_qdq(g, {x: 1.0 for x in convs})
    return out


def test_real_graphs_have_no_findings(real_graphs):
    for name, g in real_graphs.items():
        assert check_tensorrt_ops(g) == [], name


def test_padded_graph_has_no_topk_over_n_and_only_float_cumsum(real_graphs):
    """The padded layout exports without a TopK of K = N (TensorRT caps K at 3840) and without integer CumSum."""
    from clustervig.export.trt_compat import _dims, _infer, _Values

    for key in ("padded-fp32", "padded-fp16"):
        g = _infer(real_graphs[key]).graph
        vals = _Values(g, _dims(g))
        ks = [int(np.asarray(vals.full[n.input[1]]).reshape(-1)[0]) for n in g.node if n.op_type == "TopK"]
        assert sorted(ks) == [9, 13, 18], ks  # the three blocks' k-NN inside partitions, never N = 196
        types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input)}
        cumsum_inputs = [types.get(n.input[0]) for n in g.node if n.op_type == "CumSum"]
        assert all(t in (TP.FLOAT,) for t in cumsum_inputs), cumsum_inputs


def test_check_leaves_nothing_in_the_working_directory(tmp_path, monkeypatch):
    # ONNX Runtime's symbolic shape inference saves a model and its weights into the working directory
    # when it cannot finish (a plugin graph's first pass): the check must run it elsewhere
    import onnx as _onnx

    from clustervig.export.onnx_export import BatchSpec, export_onnx
    from clustervig.export.plugin_graph import to_plugin_graph
    from clustervig.export.trt_compat import tensorrt_op_issues

    from conftest import make_model

    export_onnx(make_model("cvig_nano"), tmp_path / "m.onnx", BatchSpec(1, 1, 1))
    pg, _ = to_plugin_graph(_onnx.load(str(tmp_path / "m.onnx")))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert tensorrt_op_issues(pg) == []
    assert list(work.iterdir()) == []
