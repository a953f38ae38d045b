"""Exporting a ClusterViG backbone (issue #26): a small backbone (3 narrow blocks) at a non-square size, its
named feature maps in ONNX (FP32, FP16, INT8 Q/DQ, plugin graph) against PyTorch map by map, and what a
TensorRT build of such graphs needs (docs/tensorrt.md, section 9) as trt_compat reads it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from clustervig.export.fp16 import DEFAULT_FP32_ISLANDS, convert_fp16
from clustervig.export.onnx_export import BatchSpec, export_onnx, get_metadata
from clustervig.export.plugin_graph import to_plugin_graph
from clustervig.export.trt_compat import TENSOR_MAX_ELEMENTS, check_tensorrt_ops, kmeans_smem_bytes, memory_summary
from clustervig.export.validate import OrtModel, compare, compare_maps, torch_outputs, validate

from conftest import make_model, varied_images

SIZE = (96, 160)  # 6 x 10 tokens at stride 16


@pytest.fixture(scope="module")
def images():
    return varied_images(4, SIZE, seed=21)


@pytest.fixture(scope="module")
def backbone(images):
    return make_model("cvig_nano", img_size=SIZE, calib_images=images, features_only=True, out_indices=(0, 2))


@pytest.fixture(scope="module")
def pyramid(images):
    return make_model("cvig_nano", img_size=SIZE, calib_images=images, features_only=True, feature_pyramid=True)


def ort_vs_torch(model, path, x):
    ref = torch_outputs(model, x)
    got = OrtModel(path).run(x.numpy())
    return ref, got, compare(ref, got)


@pytest.mark.parametrize("batch", [BatchSpec(2, 2, 2), BatchSpec(1, 2, 4)])
def test_backbone_onnx_equals_pytorch_every_output(backbone, images, tmp_path, batch):
    path = tmp_path / "bb.onnx"
    g = export_onnx(backbone, path, batch)
    assert [o.name for o in g.graph.output] == ["block0", "block2"]
    lead = "batch" if batch.dynamic else 2
    for o in g.graph.output:
        dims = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        assert dims == [lead, 32, 6, 10]
    meta = get_metadata(onnx.load(str(path)))
    assert json.loads(meta["clustervig.outputs"]) == [
        {"name": "block0", "channels": 32, "stride": 16, "shape": [32, 6, 10]},
        {"name": "block2", "channels": 32, "stride": 16, "shape": [32, 6, 10]}]
    assert json.loads(meta["clustervig.preprocess"])["img_size"] == [96, 160]
    assert json.loads(meta["clustervig.config"])["features_only"] is True
    ref, got, res = ort_vs_torch(backbone, path, images[:2] if not batch.dynamic else images[:3])
    for name in ("block0", "block2"):
        scale = float(np.abs(ref[name]).max())
        assert 1.0 < scale < 1e3  # calibrated random weights: O(1) maps, the tolerance means something
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4 * scale, rtol=0)
        assert res["outputs"][name]["cosine_min"] > 0.999999
        assert res["outputs"][name]["max_abs_diff"] <= 1e-4 * scale
    assert res["max_abs_diff"] == max(r["max_abs_diff"] for r in res["outputs"].values())
    assert res["label_agreement"] == 1.0 and res["neighbor_agreement"] == 1.0
    assert len(res["label_agreement_per_block"]) == 3 and "top1_agreement" not in res


def test_pyramid_onnx_equals_pytorch(pyramid, images, tmp_path):
    path = tmp_path / "pyr.onnx"
    g = export_onnx(pyramid, path, BatchSpec(2, 2, 2))
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in g.graph.output}
    assert shapes == {"p3": [2, 16, 12, 20], "p4": [2, 32, 6, 10], "p5": [2, 32, 3, 5], "p6": [2, 32, 2, 3]}
    strides = [o["stride"] for o in json.loads(get_metadata(onnx.load(str(path)))["clustervig.outputs"])]
    assert strides == [8, 16, 32, 64]
    ref, got, res = ort_vs_torch(pyramid, path, images[:2])
    for name in ("p3", "p4", "p5", "p6"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4 * float(np.abs(ref[name]).max()), rtol=0)
    assert res["cosine_min"] > 0.999999


def test_backbone_plugin_graph_equals_fp32(backbone, images, tmp_path):
    path = tmp_path / "bb.onnx"
    export_onnx(backbone, path, BatchSpec(2, 2, 2))
    pg, surgery = to_plugin_graph(onnx.load(str(path)))
    assert surgery.replaced["CvigKMeans"] == 3 and surgery.replaced["CvigPartitionedKNN"] == 3
    onnx.save(pg, str(tmp_path / "plugins.onnx"))
    x = images[:2].numpy()
    a = OrtModel(path).run(x)
    b = OrtModel(tmp_path / "plugins.onnx").run(x)
    res = compare(a, b)
    for name in ("block0", "block2"):
        np.testing.assert_allclose(b[name], a[name], atol=1e-5 * float(np.abs(a[name]).max()), rtol=0)
    assert res["label_agreement"] == 1.0 and res["neighbor_agreement"] == 1.0


def test_backbone_fp16_and_int8_graphs_run_every_output(backbone, images, tmp_path):
    from clustervig.calib import collect_ranges, quantize_qdq

    path = tmp_path / "bb.onnx"
    export_onnx(backbone, path, BatchSpec(2, 2, 2))
    g32 = onnx.load(str(path))
    g16 = convert_fp16(g32, DEFAULT_FP32_ISLANDS, False)
    assert [o.type.tensor_type.elem_type for o in g16.graph.output] == [TensorProto.FLOAT] * 2  # FP32 I/O
    onnx.save(g16, str(tmp_path / "fp16.onnx"))
    ranges = collect_ranges(g32, [images[:2].numpy(), images[2:].numpy()], "max")
    onnx.save(quantize_qdq(g32, ranges), str(tmp_path / "int8.onnx"))
    res = validate(backbone, {"fp32": path, "fp16": tmp_path / "fp16.onnx", "int8": tmp_path / "int8.onnx"},
                   {"varied": images}, chunk=2)["results"]["varied"]
    assert set(res) == {"fp32 vs pytorch", "fp16 vs pytorch", "int8 vs pytorch", "fp16 vs fp32",
                        "fp16-emulated vs fp32", "int8 vs fp32"}
    for name, r in res.items():
        assert r["nonfinite_images"] == 0 and set(r["outputs"]) == {"block0", "block2"}, name
        assert r["images"] == 4
    assert res["fp32 vs pytorch"]["cosine_min"] > 0.999999
    # reduced precision moves the maps, measurably but not wildly, on these calibrated random weights
    assert 0.5 < res["fp16-emulated vs fp32"]["cosine_min"] < 1.0
    assert 0.2 < res["int8 vs fp32"]["cosine_min"] < 1.0


def test_compare_maps_reports_the_worst_map():
    rng = np.random.default_rng(0)
    ref = {"a": rng.standard_normal((3, 4, 2, 2)), "b": rng.standard_normal((3, 8, 1, 2))}
    out = {"a": ref["a"].copy(), "b": ref["b"].copy()}
    out["b"][1] = -out["b"][1]  # image 1 of map b: cosine -1
    res = compare_maps(ref, out)
    assert res["outputs"]["a"]["cosine_min"] == pytest.approx(1.0) and res["outputs"]["a"]["max_abs_diff"] == 0
    assert res["outputs"]["b"]["cosine_min"] == pytest.approx(-1.0)
    assert res["cosine_min"] == pytest.approx(-1.0) and res["nonfinite_images"] == 0
    assert res["max_abs_diff"] == pytest.approx(2 * np.abs(ref["b"][1]).max())
    assert res["outputs"]["b"]["max_abs_reference"] == pytest.approx(np.abs(ref["b"]).max())
    out["a"][2, 0, 0, 0] = np.nan  # one image with a NaN in one map: counted, and the worst values are NaN
    res = compare_maps(ref, out)
    assert res["nonfinite_images"] == 1 and np.isnan(res["max_abs_diff"]) and np.isnan(res["cosine_min"])
    with pytest.raises(ValueError, match=r"no output \['b'\]"):
        compare_maps(ref, {"a": ref["a"]})


# -- what a TensorRT build needs (docs/tensorrt.md section 9) --------------------------------------------------


@pytest.mark.parametrize("knn,capacity", [("masked", None), ("padded", None), ("padded", 24)])
def test_memory_summary_names_the_similarity_and_topk(images, tmp_path, knn, capacity):
    model = make_model("cvig_nano", img_size=SIZE, calib_images=images, features_only=True, knn=knn,
                       capacity=capacity)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, BatchSpec(1, 2, 3))
    s = memory_summary(onnx.load(str(path)), top=None)  # at N = 60 the stem's maps are larger than the similarity
    n, kappa = 60, 4
    p = capacity or n
    assert s["batch"] == 3  # the largest of the recorded range
    sim = [r for r in s["largest"] if r["op"] == "MatMul" and r["shape"][-1] == (n if knn == "masked" else p)
           and r["shape"][-2] == r["shape"][-1]]
    assert sim, s["largest"]
    expect = [3, n, n] if knn == "masked" else [3, kappa, p, p]
    assert sim[0]["shape"] == expect and sim[0]["bytes"] == 4 * int(np.prod(expect)) and sim[0]["count"] == 3
    ks = sorted(r["k"] for r in s["topk"])
    assert ks == sorted(min(k, p) for k in model.cfg.neighbors)
    assert {r["axis_length"] for r in s["topk"]} == {n if knn == "masked" else p}
    assert s["max_elements"] < TENSOR_MAX_ELEMENTS and not check_tensorrt_ops(onnx.load(str(path)))


def test_plugin_graph_summary_has_no_similarity_and_the_kmeans_working_set(backbone, tmp_path):
    path = tmp_path / "bb.onnx"
    export_onnx(backbone, path, BatchSpec(2, 2, 2))
    pg, _ = to_plugin_graph(onnx.load(str(path)))
    s = memory_summary(pg, top=None)
    assert s["topk"] == []  # the k-NN is a plugin: no TopK, no N x N tensor
    assert not [r for r in s["largest"] if r["shape"][-2:] == [60, 60]]  # nothing N x N
    assert s["kmeans_smem"] == [{"n": 60, "c": 32, "clusters": 4, "bytes": kmeans_smem_bytes(60, 32, 4), "count": 3}]
    assert kmeans_smem_bytes(60, 32, 4) == (4 * 32 + 4) * 4 + (2 * 4 + 2 * 60) * 4


def _matmul_graph(n: int, batch_meta: str = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["sim"], name="blocks.0.grapher.degc/knn/MatMul"),
             helper.make_node("ReduceMax", ["sim"], ["y"], name="r", keepdims=0, axes=[2])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    if batch_meta:
        helper.set_model_props(m, {"clustervig.batch": batch_meta})
    return m


def test_tensor_volume_above_two_to_the_31_is_flagged_at_the_largest_batch():
    # [B, 4200, 4200]: 17.64 M elements per image; 121 images fit in 2**31 - 1, 122 do not
    ok = check_tensorrt_ops(_matmul_graph(4200, "1:8:121"))
    assert not ok
    bad = check_tensorrt_ops(_matmul_graph(4200, "1:8:122"))
    assert len(bad) == 1 and bad[0].severity == "error" and bad[0].op == "MatMul"
    line = bad[0].line()
    assert "[122, 4200, 4200] has 2152080000 elements" in line and "a batch of at most 121 fits" in line
    assert not check_tensorrt_ops(_matmul_graph(4200))  # no batch recorded: nothing is guessed


def test_detection_resolution_needs_as_docs_tensorrt_md_states(tmp_path):
    # docs/tensorrt.md section 9, on cvig_s's own block at 800 x 1344 (N = 50 x 84 = 4200, C = 320, kappa 4;
    # one block of the 16: every block has these shapes): the masked similarity, the TopK sizes, the batch at
    # which a tensor passes 2**31 - 1 elements, and the plugin k-means working set
    torch.manual_seed(0)
    from clustervig import create_model
    from clustervig.utils import calibrate_batchnorm

    model = create_model("cvig_s", img_size=(800, 1344), features_only=True, depth=1, knn="masked")
    calibrate_batchnorm(model, [varied_images(1, (800, 1344), seed=3)])
    path = tmp_path / "s.onnx"
    export_onnx(model, path, BatchSpec(1, 1, 121))
    g = onnx.load(str(path))
    s = memory_summary(g)
    sim = [r for r in s["largest"] if r["example"].endswith("/knn/MatMul")]
    assert sim[0]["shape"] == [121, 4200, 4200] and sim[0]["bytes"] == 121 * 4200 * 4200 * 4
    assert [(r["axis_length"], r["k"]) for r in s["topk"]] == [(4200, 9)]
    assert not check_tensorrt_ops(g)  # batch 121: 2,134,440,000 elements, below 2**31 - 1
    helper.set_model_props(g, {"clustervig.batch": "1:1:122"})
    bad = check_tensorrt_ops(g)
    assert bad and {f.op for f in bad} >= {"MatMul"} and "a batch of at most 121 fits" in bad[0].line()
    pg, _ = to_plugin_graph(onnx.load(str(path)))
    smem = memory_summary(pg)["kmeans_smem"]
    assert smem == [{"n": 4200, "c": 320, "clusters": 4, "bytes": 38768, "count": 1}]
    assert not [f for f in check_tensorrt_ops(pg) if "working set" in f.message]  # below 48 KiB: no opt-in
    assert kmeans_smem_bytes(5498, 320, 4) <= 48 * 1024 < kmeans_smem_bytes(5499, 320, 4)
