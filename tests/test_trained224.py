"""FP16 and INT8 fidelity of the trained 224-px model (cvig_photos: 14x14 tokens, 12 blocks) on held-out crops.

Guards the FP16 pass and the INT8 placement on a trained network at the paper's resolution: a slice of the
held-out split (2 crops per class, 32 images) must keep the agreement with FP32 that bench.trained224
measured on it (BENCHMARKS.md, "A trained model at 224 px"), within the margins below.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import clustervig
from clustervig.calib import array_batches, collect_ranges, quantize_qdq
from clustervig.export.fp16 import convert_fp16
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.validate import OrtModel, compare
from clustervig.photo_data import photo_patches_split
from clustervig.preprocess import transform_spec
from clustervig.train import WEIGHTS_DIR

CKPT = WEIGHTS_DIR / "cvig_photos.pth"
# Measured on this slice by the code below (bench.trained224 measures the whole split): FP32 top-1 0.594 (19 of
# 32); FP16 (default islands) top-1 agreement 0.969 (31 of 32), cosine mean 0.9998, labels 0.915; INT8 (max, 16
# calibration crops) top-1 agreement 1.0, cosine mean 0.9962, labels 0.753. Gates: one or two images (of 32) and
# a few points of label agreement below that.
GATES = {
    "fp32_top1": 0.56,
    "fp16": {"top1_agreement": 0.93, "cosine_mean": 0.999, "label_agreement": 0.90},
    "int8": {"top1_agreement": 0.87, "cosine_mean": 0.99, "label_agreement": 0.70},
}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    ck = torch.load(CKPT, map_location="cpu", weights_only=False)
    r = ck["recipe"]
    model = clustervig.create_model("cvig_photos", pretrained=CKPT).eval()
    cfg = model.cfg
    # the test stream does not depend on the number of training crops: the same held-out crops as training used
    train, test = photo_patches_split(1, r["test_per_class"], cfg.img_size, r["data_seed"], cfg.mean, cfg.std)
    idx = np.concatenate([np.flatnonzero(test.labels.numpy() == c)[:2] for c in range(cfg.num_classes)])
    x, y = test.images[idx].numpy(), test.labels[idx].numpy()
    path = tmp_path_factory.mktemp("p224") / "fp32.onnx"
    export_onnx(model, path, BatchSpec(1, 32, 32))
    g32 = onnx.load(str(path))
    ranges = collect_ranges(g32, array_batches(train.images.numpy(), transform_spec(cfg), 8), "max")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x)).numpy()
    ref = OrtModel(g32).run(x)
    return {"x": x, "y": y, "torch": torch_logits, "fp32": ref, "fp16": OrtModel(convert_fp16(g32)).run(x),
            "int8": OrtModel(quantize_qdq(g32, ranges)).run(x)}


def test_fp32_graph_is_the_trained_model(graphs):
    # ONNX Runtime's FP32 rounding moves a few k-means decisions over 12 blocks (max |dlogits| 0.008 here)
    r = compare({"logits": graphs["torch"]}, graphs["fp32"])
    assert r["cosine_min"] >= 0.9999 and r["top1_agreement"] == 1.0
    assert (graphs["fp32"]["logits"].argmax(1) == graphs["y"]).mean() >= GATES["fp32_top1"]


@pytest.mark.parametrize("artifact", ["fp16", "int8"])
def test_agreement_with_fp32(graphs, artifact):
    r = compare(graphs["fp32"], graphs[artifact])
    for key, bound in GATES[artifact].items():
        assert r[key] >= bound, f"{artifact} {key} = {r[key]:.4f} < {bound}"
