"""ONNX export: ORT CPU equals PyTorch, stable names, FP16 graph, metadata."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import clustervig
from clustervig.export.fp16 import convert_fp16, count_precision, is_island
from clustervig.export.onnx_export import BatchSpec, ExportError, export_onnx, get_metadata
from clustervig.export.validate import OrtModel, compare, torch_outputs
from clustervig.preprocess import sample_photographs, transform_spec
from clustervig.train import WEIGHTS_DIR
from clustervig.utils import calibrate_batchnorm


def photos_model(name: str, seed: int = 0):
    # Seeded: with random weights, whether any k-means distance lands within
    # float rounding of a tie (and flips a label between backends) depends on
    # the draw; see README "A property of the model worth knowing".
    torch.manual_seed(seed)
    model = clustervig.create_model(name)
    photos = sample_photographs(transform_spec(model.cfg))  # 4 real photographs
    calibrate_batchnorm(model, [photos])
    return model.eval(), photos


@pytest.fixture(scope="module")
def ti():
    # seed 1: a draw whose k-means decisions on these photos have no float-level
    # near-ties; test_differences_are_only_label_flips covers the other draws
    return photos_model("cvig_ti", seed=1)


@pytest.fixture(scope="module")
def nano():
    return photos_model("cvig_nano")


def ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize("which", ["nano", "ti"])
@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_ort_fp32_equals_pytorch(request, tmp_path, which, batch):
    model, photos = request.getfixturevalue(which)
    with torch.no_grad():
        ref = model(photos).numpy()
    if batch == "static":
        for b in (1, 4):
            export_onnx(model, tmp_path / f"m{b}.onnx", BatchSpec(b, b, b))
            out = ort_logits(tmp_path / f"m{b}.onnx", photos[:b])
            assert np.abs(out - ref[:b]).max() <= 1e-4, (b, float(np.abs(out - ref[:b]).max()))
        # no batch-sized constants (masked-k-NN fills once traced into [B, N, N] tensors)
        assert (tmp_path / "m4.onnx").stat().st_size <= 1.2 * (tmp_path / "m1.onnx").stat().st_size  # was 2x (nano)
    else:
        export_onnx(model, tmp_path / "m.onnx", BatchSpec(1, 4, 8))
        for b in (1, 4):
            out = ort_logits(tmp_path / "m.onnx", photos[:b])
            assert np.abs(out - ref[:b]).max() <= 1e-4, (b, float(np.abs(out - ref[:b]).max()))
        g = onnx.load(str(tmp_path / "m.onnx"))
        assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_stable_names_metadata_and_checker(tmp_path, nano):
    model, _ = nano
    g = export_onnx(model, tmp_path / "m.onnx", BatchSpec(1, 1, 1))
    assert g.opset_import[0].version >= 17
    assert [i.name for i in g.graph.input] == ["images"] and [o.name for o in g.graph.output] == ["logits"]
    names = [n.name for n in g.graph.node]
    assert len(set(names)) == len(names)
    for i in range(model.cfg.depth):
        for piece in ("norm", "kmeans", "knn", "centroids", "gat", "local"):
            assert any(n.startswith(f"blocks.{i}.grapher.degc/{piece}/") for n in names), (i, piece)
    # T updates and T + 1 assignments, unrolled
    assert sum(n.startswith("blocks.0.grapher.degc/kmeans/ArgMin") for n in names) == model.cfg.kmeans_iters + 1
    assert any(n.startswith("blocks.0.grapher.degc/knn/TopK") for n in names)
    assert any(n.startswith("stem.convs.0.0/Conv") for n in names)
    meta = get_metadata(onnx.load(str(tmp_path / "m.onnx")))
    cfg = json.loads(meta["clustervig.config"])
    assert cfg["name"] == "cvig_nano" and json.loads(meta["clustervig.preprocess"])["img_size"] == 224


def test_padded_knn_export_equals_pytorch(tmp_path, nano):
    model, photos = nano
    model.set_form("static", knn="padded", capacity=None)
    try:
        export_onnx(model, tmp_path / "p.onnx", BatchSpec(1, 2, 4))
        with torch.no_grad():
            ref = model(photos).numpy()
    finally:
        model.set_form("static", knn="masked")
    assert np.abs(ort_logits(tmp_path / "p.onnx", photos) - ref).max() <= 1e-4


def test_normalize_in_graph(tmp_path, nano):
    model, photos = nano
    export_onnx(model, tmp_path / "n.onnx", BatchSpec(1, 1, 1), normalize_in_graph=True)
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)
    raw = photos[:1] * std + mean  # back to [0, 1] RGB
    with torch.no_grad():
        ref = model(photos[:1]).numpy()
    assert np.abs(ort_logits(tmp_path / "n.onnx", raw) - ref).max() <= 1e-4


def test_opset_too_low(tmp_path, nano):
    with pytest.raises(ExportError, match="opset 16 is too low"):
        export_onnx(nano[0], tmp_path / "x.onnx", opset=16)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from clustervig.data import digits_split

    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    _, test = digits_split()
    d = tmp_path_factory.mktemp("digits")
    export_onnx(model, d / "fp32.onnx", BatchSpec(1, 64, 512))
    g16 = convert_fp16(onnx.load(str(d / "fp32.onnx")))
    onnx.save(g16, str(d / "fp16.onnx"))
    return model, test, d


def test_fp16_graph_computes_in_fp16_with_fp32_islands(digits):
    _, _, d = digits
    g16 = onnx.load(str(d / "fp16.onnx"))
    onnx.checker.check_model(g16, full_check=True)
    prec = count_precision(g16)
    assert prec["Conv"]["fp32"] == 0 and prec["Conv"]["fp16"] > 0  # every conv in FP16
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(g16).graph.value_info}
    types.update({t.name: t.data_type for t in g16.graph.initializer})
    for n in g16.graph.node:
        if n.op_type == "MatMul":
            want = onnx.TensorProto.FLOAT if is_island(n.name, ("norm", "kmeans", "knn")) else onnx.TensorProto.FLOAT16
            assert types[n.input[0]] == want, n.name
    # graph I/O stays FP32 by default
    assert g16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_accuracy_on_trained_digits(digits):
    model, test, d = digits
    x = test.images
    fp32, fp16 = OrtModel(d / "fp32.onnx"), OrtModel(d / "fp16.onnx")
    a, b = fp32.run(x.numpy()), fp16.run(x.numpy())
    r = compare(a, b)
    assert r["cosine_mean"] >= 0.999
    assert r["top1_agreement"] >= 0.99
    assert 0.5 < r["label_agreement"] <= 1.0 and 0.5 < r["neighbor_agreement"] <= 1.0
    # FP16 as a GPU computes it (every op rounded; ORT's own FP16 run is mostly FP32 inside)
    from clustervig.export.fp16_emulate import emulate_fp16

    e = compare(a, OrtModel(emulate_fp16(onnx.load(str(d / "fp16.onnx")))).run(x.numpy()))
    assert e["cosine_mean"] >= 0.998 and e["top1_agreement"] >= 0.99
    acc32 = (a["logits"].argmax(1) == test.labels.numpy()).mean()
    acc16 = (b["logits"].argmax(1) == test.labels.numpy()).mean()
    assert acc32 >= 0.97 and abs(acc16 - acc32) <= 0.003
    # FP32 graph decisions equal PyTorch's on most tokens (k-means is chaotic in its input)
    ref = torch_outputs(model, x[:32])
    r32 = compare(ref, fp32.run(x[:32].numpy()))
    assert r32["top1_agreement"] == 1.0 and r32["label_agreement"] > 0.95


def test_fp16_io_option(tmp_path, nano):
    model, photos = nano
    export_onnx(model, tmp_path / "m.onnx", BatchSpec(1, 1, 1))
    g = convert_fp16(onnx.load(str(tmp_path / "m.onnx")), fp16_io=True)
    onnx.save(g, str(tmp_path / "h.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float16)" and sess.get_outputs()[0].type == "tensor(float16)"
    out = sess.run(None, {"images": photos[:1].numpy().astype(np.float16)})[0]
    assert out.dtype == np.float16 and np.isfinite(out).all()


@pytest.mark.parametrize("seed", [0, 2])
def test_differences_are_only_label_flips(tmp_path, seed):
    """For any random draw, ORT differs from PyTorch only through discrete near-ties.

    When every k-means label and every k-NN neighbour agrees, logits agree to
    1e-4; when they do not, only a handful of decisions flipped (a distance or
    similarity within float rounding of a tie).
    """
    model, photos = photos_model("cvig_ti", seed=seed)
    export_onnx(model, tmp_path / "m.onnx", BatchSpec(4, 4, 4))
    r = compare(torch_outputs(model, photos), OrtModel(tmp_path / "m.onnx").run(photos.numpy()))
    if r["label_agreement"] == 1.0 and r["neighbor_agreement"] == 1.0:
        assert r["max_abs_diff"] <= 1e-4
    else:
        assert r["label_agreement"] >= 0.98 and r["neighbor_agreement"] >= 0.98
        assert r["cosine_min"] >= 0.999
    assert r["top1_agreement"] >= 0.75


def test_simplification_keeps_names_and_outputs(tmp_path, nano):
    model, photos = nano
    full = export_onnx(model, tmp_path / "full.onnx", BatchSpec(1, 2, 4), simplify=False)
    simp = export_onnx(model, tmp_path / "simp.onnx", BatchSpec(1, 2, 4), simplify=True)
    assert len(simp.graph.node) < 0.9 * len(full.graph.node)
    kept = {n.name for n in simp.graph.node}
    assert kept <= {n.name for n in full.graph.node}  # no renamed or new nodes
    assert np.array_equal(ort_logits(tmp_path / "full.onnx", photos[:2]), ort_logits(tmp_path / "simp.onnx", photos[:2]))
    assert "clustervig.config" in get_metadata(onnx.load(str(tmp_path / "simp.onnx")))
