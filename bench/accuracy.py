"""Accuracy of every artifact of the trained digits model on its 360 held-out scans.

    python -m bench.accuracy

PyTorch FP32, ONNX Runtime FP32, FP16, INT8 (max / entropy / percentile
calibration on 256 training scans) and the plugin graph; top-1, agreement with
PyTorch and logit cosine. Writes bench/results/accuracy_digits.json and the
"accuracy" section of BENCHMARKS.md.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

import clustervig
from clustervig.calib import array_batches, collect_ranges, quantize_qdq
from clustervig.calib.accuracy import evaluate
from clustervig.data import digits_split
from clustervig.export.fp16 import convert_fp16
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.plugin_graph import to_plugin_graph
from clustervig.runtime import open_session
from clustervig.train import WEIGHTS_DIR

from .common import machine, update_section, write_json


def run() -> dict:
    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    train, test = digits_split()
    x, y = test.images.numpy(), test.labels.numpy()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        export_onnx(model, d / "fp32.onnx", BatchSpec(1, 64, 512))
        g32 = onnx.load(str(d / "fp32.onnx"))
        paths = {"onnxruntime fp32": d / "fp32.onnx"}
        onnx.save(convert_fp16(g32), str(d / "fp16.onnx"))
        paths["onnxruntime fp16"] = d / "fp16.onnx"
        calib = train.images[:256].numpy()
        for method in ("max", "entropy", "percentile"):
            r = collect_ranges(g32, array_batches(calib, {"img_size": 32}, 64), method)
            onnx.save(quantize_qdq(g32, r), str(d / f"int8_{method}.onnx"))
            paths[f"onnxruntime int8 ({method})"] = d / f"int8_{method}.onnx"
        onnx.save(to_plugin_graph(g32)[0], str(d / "plugins.onnx"))
        paths["plugin graph (CPU ref ops)"] = d / "plugins.onnx"
        with torch.no_grad():
            logits = {"pytorch fp32": model(test.images).numpy()}
        for name, p in paths.items():
            with open_session(p) as s:
                logits[name] = s.infer(x)
    return {"machine": machine(), "rows": evaluate(logits, y), "calibration": "256 training scans"}


def main() -> int:
    res = run()
    write_json("accuracy_digits", res)
    lines = ["## Accuracy: trained `cvig_digits` on 360 held-out scans", "",
             "`python -m bench.accuracy` — INT8: symmetric Q/DQ, per-channel weights, per-tensor activations, "
             "calibrated on 256 training scans; k-means/k-NN/normalisation/GATv2 stay in float.", "",
             "| artifact | top-1 | agreement with PyTorch | logit cosine mean | min |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['top1'] * 100:.2f}% | {r['agreement_with_reference'] * 100:.2f}% | "
                     f"{r['cosine_mean']:.5f} | {r['cosine_min']:.5f} |")
        print(f"{r['model']:<30} {r['top1'] * 100:6.2f}%  agree {r['agreement_with_reference'] * 100:6.2f}%")
    update_section("accuracy", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
