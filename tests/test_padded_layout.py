"""Padded k-NN layout without sorting (docs/design.md section 3) and cvig-export --capacity.

partition_layout counts each token's rank in its partition instead of sorting all N
tokens (an argsort exports as TopK with K = N, and TensorRT's TopK stops at K = 3840).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from clustervig.export.cli import CAPACITY_AUTO_MARGIN, main as export_main
from clustervig.graph import knn_padded, l2_normalize, partition_layout


def layout_reference(labels: np.ndarray, k: int, p: int):
    """Per image: partition j's members in token order, the first p of them in slots j*p .. j*p+p-1."""
    b, n = labels.shape
    slot_token = np.zeros((b, k * p), np.int64)
    slot_valid = np.zeros((b, k * p), bool)
    token_slot = np.zeros((b, n), np.int64)
    overflow = np.zeros((b, n), bool)
    for i in range(b):
        for j in range(k):
            members = np.flatnonzero(labels[i] == j)
            for r, v in enumerate(members):
                if r < p:
                    slot_token[i, j * p + r] = v
                    slot_valid[i, j * p + r] = True
                    token_slot[i, v] = j * p + r
                else:
                    overflow[i, v] = True
    return slot_token, slot_valid, token_slot, overflow


@pytest.mark.parametrize("n", [1, 2, 5, 12, 50, 196, 197, 250])  # square and non-square N (padded rows)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_layout_equals_reference(n, k):
    rng = np.random.default_rng(n * 10 + k)
    # skewed labels: some partitions empty, one large
    probs = rng.dirichlet(np.full(k, 0.5))
    labels = np.stack([rng.choice(k, size=n, p=probs) for _ in range(3)])
    for p in sorted({1, max(1, n // (2 * k)), int(np.bincount(labels.reshape(-1), minlength=k).max()), n}):
        got = [t.numpy() for t in partition_layout(torch.tensor(labels), k, p)]
        ref = layout_reference(labels, k, p)
        for name, g, r in zip(("slot_token", "slot_valid", "token_slot", "overflow"), got, ref):
            np.testing.assert_array_equal(g, r, err_msg=f"{name} n={n} k={k} p={p}")


class _Layout(nn.Module):
    def __init__(self, k, p):
        super().__init__()
        self.k, self.p = k, p

    def forward(self, labels):
        return partition_layout(labels, self.k, self.p)


class _KNN(nn.Module):
    def __init__(self, k, clusters, p):
        super().__init__()
        self.k, self.clusters, self.p = k, clusters, p

    def forward(self, xn, labels):
        return knn_padded(xn, labels, self.k, self.clusters, self.p)


def _export(module, args, names, path, dynamic=True):
    axes = {nm: {0: "batch"} for nm in names} if dynamic else None
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=17, input_names=names,
                      dynamic_axes=axes, do_constant_folding=True)
    g = onnx.load(str(path))
    onnx.checker.check_model(g, full_check=True)
    return g


def test_layout_above_topk_limit_exports_without_topk(tmp_path):
    # 63 x 63 = 3969 tokens: beyond TensorRT's K <= 3840, where the argsort layout could not go
    n, k = 63 * 63, 6
    rng = np.random.default_rng(0)
    labels = rng.choice(k, size=(2, n), p=[0.5, 0.2, 0.1, 0.1, 0.1, 0.0])
    p = 1500  # partition 0 (about 1985 members) overflows
    g = _export(_Layout(k, p), (torch.tensor(labels[:1]),), ["labels"], tmp_path / "layout.onnx")
    ops = {nd.op_type for nd in g.graph.node}
    assert not ops & {"TopK", "CumSum", "ArgMax", "ArgMin"}, ops
    sess = ort.InferenceSession(str(tmp_path / "layout.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"labels": labels})
    for g_, r in zip(got, layout_reference(labels, k, p)):
        np.testing.assert_array_equal(g_, r)
    assert got[3].sum() > 0


def test_padded_knn_onnx_equals_pytorch_with_overflow(tmp_path):
    torch.manual_seed(0)
    n, c, clusters = 300, 8, 4  # N not a square: the layout pads its last row
    xn = l2_normalize(torch.randn(3, n, c))
    labels = torch.tensor(np.random.default_rng(1).choice(clusters, size=(3, n), p=[0.55, 0.25, 0.2, 0.0]))
    for p, k in ((110, 9), (5, 9)):  # partition 0 overflows; and a capacity below K
        idx, valid, overflow = knn_padded(xn, labels, k, clusters, p)
        assert overflow.any()
        path = tmp_path / f"knn{p}.onnx"
        g = _export(_KNN(k, clusters, p), (xn[:1], labels[:1]), ["xn", "labels"], path)
        ks = [nd for nd in g.graph.node if nd.op_type == "TopK"]
        assert len(ks) == 1 and not any(nd.op_type == "CumSum" for nd in g.graph.node)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        o_idx, o_valid, o_over = sess.run(None, {"xn": xn.numpy(), "labels": labels.numpy()})
        np.testing.assert_array_equal(o_idx, idx.numpy())
        np.testing.assert_array_equal(o_valid, valid.numpy())
        np.testing.assert_array_equal(o_over, overflow.numpy())


# --- cvig-export --capacity ---------------------------------------------------


@pytest.fixture(scope="module")
def calib_folder(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(8):
        yy, xx = np.mgrid[0:96, 0:96]
        img = (127 + 100 * np.sin((xx * (i + 1) + yy * (8 - i)) / 30.0))[..., None] * np.ones(3)
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    return d


def test_capacity_auto(tmp_path, calib_folder):
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--knn", "padded", "--capacity", "auto",
                                           "--calib-dir", str(calib_folder), "--calib-samples", "8", "--no-engine",
                                           "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    cap = report["capacity"]
    n = 196
    assert cap["mode"] == "auto" and cap["tokens"] == n and cap["margin"] == CAPACITY_AUTO_MARGIN
    assert sorted(cap["sets"]) == ["calibration", "photos", "random"]
    need = max(s["largest_partition"] for s in cap["sets"].values())
    assert cap["largest_partition"] == need
    assert cap["capacity"] == min(n, -(-need * 5 // 4))  # ceil(1.25 * need), at most N
    for name, s in cap["sets"].items():
        assert s["overflow_at_capacity"] == 0 and s["overflow_at_largest_partition"] == 0, name
    # one below the measured maximum, the set holding that partition overflows: the maximum is tight
    assert any(s["overflow_below_largest_partition"] > 0 for s in cap["sets"].values())
    # the exported graph is the one with the chosen capacity, validated against PyTorch
    assert report["model"]["capacity"] == cap["capacity"] and report["model"]["knn"] == "padded"
    assert report["validation"]["results"]["photos"]["fp32 vs pytorch"]["max_abs_diff"] <= 1e-4
    assert report["artifacts"]["fp32"]["tensorrt_op_issues"] == []


@pytest.mark.parametrize("args,message", [
    (["--knn", "padded", "--capacity", "0"], "must be >= 1"),
    (["--knn", "padded", "--capacity", "-3"], "must be >= 1"),
    (["--knn", "padded", "--capacity", "1.5"], "neither an integer capacity nor 'auto'"),
    (["--knn", "padded", "--capacity", "most"], "neither an integer capacity nor 'auto'"),
    (["--knn", "padded", "--capacity", "197"], "above N = 196"),
    (["--capacity", "auto"], "applies to the padded k-NN layout"),  # knn auto is masked for N = 196
    (["--knn", "masked", "--capacity", "auto"], "applies to the padded k-NN layout"),
])
def test_capacity_bad_values(tmp_path, args, message):
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", *args, "--no-engine", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_capacity_fixed_is_recorded(tmp_path):
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--knn", "padded", "--capacity", "60", "--no-validate",
                                           "--no-engine", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    cap = report["capacity"]
    assert {k: cap[k] for k in ("mode", "capacity", "tokens")} == {"mode": "fixed", "capacity": 60, "tokens": 196}
    assert sorted(cap["sets"]) == ["photos", "random"]  # the overflow at P is measured as for auto
    assert report["model"]["capacity"] == 60
