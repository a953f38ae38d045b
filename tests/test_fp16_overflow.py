"""FP16 overflow: range analysis of the FP32 graph keeps the nodes FP16 cannot hold in FP32 (docs/design.md section 5)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import clustervig
from clustervig import save_checkpoint
from clustervig.export.cli import main as export_main
from clustervig.export.fp16 import (FP16_MAX, FP16_SAFE_BOUND, convert_fp16, float_tensor_ranges, overflow_nodes,
                                    unsafe_tensors)
from clustervig.export.fp16_emulate import emulate_fp16
from clustervig.export.validate import OrtModel
from clustervig.train import WEIGHTS_DIR


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def amplifier(batch: int = 0):
    """x -> MatMul(W, x1000) -> h -> Mul(1e-3) -> Add(b) -> y: h overflows FP16, y does not."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 8)) * 1000).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="blocks.0.grapher.degc/gat/MatMul"),
        helper.make_node("Mul", ["h", "s"], ["t"], name="blocks.0.grapher.degc/gat/Mul"),
        helper.make_node("Add", ["t", "b"], ["y"], name="blocks.0.grapher.degc/gat/Add"),
    ]
    dim = batch or "batch"
    g = helper.make_graph(nodes, "amp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(1e-3), "s"),
                           numpy_helper.from_array(np.ones(8, np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w


def test_ranges_are_the_max_abs_of_every_float_tensor():
    model, w = amplifier(batch=2)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)]
    r = float_tensor_ranges(model, batches)  # static batch 2: 3 images are fed as 2 + (1 padded with itself)
    x = np.concatenate(batches)
    h = x @ w
    want = {"x": np.abs(x).max(), "h": np.abs(h).max(), "t": np.abs(h * np.float32(1e-3)).max(),
            "y": np.abs(h * np.float32(1e-3) + 1).max(), "w": np.abs(w).max(), "s": 1e-3, "b": 1.0}
    assert set(r) == set(want)
    for k, v in want.items():
        assert r[k] == pytest.approx(float(v), rel=1e-6), k


def test_overflowing_tensor_keeps_producer_and_consumer_in_fp32():
    model, _ = amplifier()
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32) * 20
    r = float_tensor_ranges(model, [x])
    assert FP16_MAX < r["h"]  # the MatMul output does not fit FP16 at all
    kept = overflow_nodes(model, r, islands=())
    assert [k["node"] for k in kept] == ["blocks.0.grapher.degc/gat/MatMul", "blocks.0.grapher.degc/gat/Mul"]  # Add reads t, which fits
    assert kept[0]["tensor"] == "h" and kept[0]["max_abs"] == r["h"]
    ref = run(model, x)
    # without the range analysis every FP16 run (the per-op rounding a GPU does) overflows
    assert not np.isfinite(run(emulate_fp16(convert_fp16(model, islands=())), x)).all()
    g16 = convert_fp16(model, islands=(), keep_fp32=[k["node"] for k in kept])
    onnx.checker.check_model(g16, full_check=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(g16).graph.value_info}
    assert types["h"] == TensorProto.FLOAT and types["t"] == TensorProto.FLOAT and types["t:fp16"] == TensorProto.FLOAT16
    got = run(emulate_fp16(g16), x)
    assert np.isfinite(got).all() and np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    # a node inside an FP32 island is not listed (it is FP32 anyway)
    assert overflow_nodes(model, r, islands=("gat",)) == []


def test_copies_of_safe_values_and_constants_stay_fp16():
    """The masked k-NN's -1e4 sentinel is a constant FP16 holds: Where/TopK passing it on are not kept,
    a Where passing on a large computed value is, and so is a constant FP16 cannot hold."""
    f32 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    nodes = [
        helper.make_node("Greater", ["x", "zero"], ["c"], name="m/Greater"),
        helper.make_node("Where", ["c", "x", "sentinel"], ["masked"], name="m/Where"),
        helper.make_node("TopK", ["masked", "k"], ["v", "i"], name="m/TopK"),
        helper.make_node("Mul", ["x", "big"], ["grown"], name="m/Mul"),
        helper.make_node("Where", ["c", "grown", "x"], ["sel"], name="m/Where_1"),
        helper.make_node("Mul", ["x", "huge"], ["z"], name="m/Mul_1"),
    ]
    inits = [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(-1e4), "sentinel"),
             numpy_helper.from_array(np.array([2], np.int64), "k"), numpy_helper.from_array(np.float32(5e3), "big"),
             numpy_helper.from_array(np.float32(1e5), "huge")]
    g = helper.make_graph(nodes, "m", [f32("x", [2, 6])], [f32("v", None), f32("sel", None), f32("z", None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).uniform(-1, 1, (2, 6)).astype(np.float32)
    x[0, 0] = 0.95  # Where_1 passes 0.95 * 5e3 on
    r = float_tensor_ranges(model, [x])
    assert r["masked"] == 1e4 > FP16_SAFE_BOUND and r["sel"] == pytest.approx(4750)
    assert unsafe_tensors(model, r) == {"grown", "sel", "huge", "z"}
    assert [k["node"] for k in overflow_nodes(model, r, islands=())] == ["m/Mul", "m/Where_1", "m/Mul_1"]


@pytest.fixture(scope="module")
def overflow_ckpt(tmp_path_factory):
    """An overflowing model, small: cvig_digits with random weights, random BatchNorm statistics (mean ~
    N(0, 0.1), var ~ U(0.5, 1.5)), and the stem's last BatchNorm scaled by 3000, so that activations grow
    past FP16's range (to 2e7) as cvig_ti's do with the plain recipe (to 7e9)."""
    torch.manual_seed(0)
    m = clustervig.create_model("cvig_digits").eval()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))
    with torch.no_grad():
        m.stem.convs[-1][1].weight.mul_(3000.0)
    return save_checkpoint(m, tmp_path_factory.mktemp("ck") / "overflow.pth")


def test_export_keeps_overflowing_nodes_fp32_and_fp16_is_finite(tmp_path, overflow_ckpt):
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(overflow_ckpt), "--fp16", "--no-engine", "--samples", "1",
                                           "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    ra = report["fp16_range_analysis"]
    assert ra["bound"] == FP16_SAFE_BOUND and ra["max_abs_outside_islands"] > FP16_MAX
    kept = {k["node"] for k in ra["kept_fp32"]}
    assert "blocks.0.grapher.fc1.0/Conv" in kept and len(kept) > 50
    assert all(k["max_abs"] > FP16_SAFE_BOUND for k in ra["kept_fp32"])
    assert f"{len(kept)} nodes kept in FP32" in res.output
    assert report["artifacts"]["fp16"]["precision_of_compute_ops"]["Conv"]["fp32"] > 0
    for set_name, comps in report["validation"]["results"].items():
        for name in ("fp16 vs fp32", "fp16-emulated vs fp32"):
            r = comps[name]
            assert r["nonfinite_images"] == 0 and np.isfinite(r["max_abs_diff"]), (set_name, name)
            assert r["cosine_min"] >= 0.98, (set_name, name)  # measured 0.9949 and up
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    g16 = onnx.load(str(out / "model_fp16.onnx"))
    assert np.isfinite(OrtModel(emulate_fp16(g16), with_graph_outputs=False).run(x)["logits"]).all()
    assert json.loads((out / "model_fp16.json").read_text())["clustervig.fp32_kept_by_range"] == str(len(kept))


def test_fp16_that_still_overflows_fails_the_export(tmp_path, monkeypatch, overflow_ckpt):
    """Should anything still overflow (here: the range analysis is switched off), the export fails."""
    import clustervig.export.cli as cli

    monkeypatch.setattr(cli, "overflow_nodes", lambda *a, **k: [])
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(overflow_ckpt), "--fp16", "--no-engine", "--samples", "1",
                                           "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "GATE FAILED fp16.finite: fp16-emulated vs fp32 on photos: non-finite logits (NaN/inf) for 1 of 1 images" \
        in res.output
    failed = [p for p in out.iterdir()]
    assert len(failed) == 1 and failed[0].name.startswith("failed-")  # nothing published
    report = json.loads((failed[0] / "report.json").read_text())
    assert report["published"] is False and report["fp16_range_analysis"]["kept_fp32"] == []
    assert sorted(p.name for p in failed[0].iterdir()) == ["model_fp16.onnx", "model_fp32.onnx", "report.json"]


def test_trained_digits_range_analysis_keeps_nothing(tmp_path):
    from clustervig.data import digits_split
    from clustervig.export.onnx_export import BatchSpec, export_onnx

    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    export_onnx(model, tmp_path / "m.onnx", BatchSpec(1, 64, 512))
    g32 = onnx.load(str(tmp_path / "m.onnx"))
    _, test = digits_split()
    r = float_tensor_ranges(g32, [test.images[:64].numpy()])
    assert max(v for k, v in r.items() if "degc/knn/" not in k and "gat/Constant" not in k) < FP16_SAFE_BOUND / 4
    assert overflow_nodes(g32, r) == []
    # so its FP16 graph is the one whose accuracy tests/test_export_onnx.py measures
    assert convert_fp16(g32, keep_fp32=[]).SerializeToString() == convert_fp16(g32).SerializeToString()
    # without the k-NN island its -1e4 sentinel (Where, TopK) runs in FP16: a constant FP16 holds
    assert overflow_nodes(g32, r, islands=("norm", "kmeans")) == []
