"""Which DEGC pieces need FP32 in the FP16 graph: the measurement behind ``DEFAULT_FP32_ISLANDS``.

    python -m bench.fp16_islands

Two measurements, written to bench/results/fp16_islands_cpu.json and the
"fp16-islands" section of BENCHMARKS.md:

1. Teacher-forced, per piece: every DEGC gets the exact FP32 input of the
   FP32 model, rounded to FP16 as the fc1 conv delivers it in an FP16 graph;
   normalisation, k-means and k-NN then run in FP16 (torch half) or FP32.
   Agreement with the all-FP32 decisions isolates what each island buys,
   free of the chaos that compounds over blocks.
2. End to end: the FP16 ONNX graph with each island set, run with per-op
   FP16 rounding (``clustervig.export.fp16_emulate``; ONNX Runtime's own
   CPU FP16 run cannot tell island sets apart, it runs those chains in FP32)
   and compared with the FP32 graph: logit cosine and top-1 on the trained
   digits model (360 held-out scans).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import onnx
import torch

import clustervig
from clustervig.export.fp16 import convert_fp16
from clustervig.export.fp16_emulate import emulate_fp16
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.validate import OrtModel, compare, neighbor_agreement
from clustervig.graph import kmeans, knn_masked, l2_normalize

from .common import machine, update_section, write_json

# (norm, kmeans, knn) in FP16? 1 = FP16, 0 = FP32
PIECE_VARIANTS = {
    "none (all FP16)": (1, 1, 1),
    "norm": (0, 1, 1),
    "norm,kmeans": (0, 0, 1),
    "norm,kmeans,knn": (0, 0, 0),
}
GRAPH_ISLANDS = [(), ("norm",), ("norm", "kmeans"), ("norm", "kmeans", "knn"),
                 ("norm", "kmeans", "knn", "centroids", "gat")]


def digits_model() -> Tuple[clustervig.ClusterViG, torch.Tensor]:
    from clustervig.data import digits_split
    from clustervig.train import WEIGHTS_DIR

    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    return model, digits_split()[1].images


def ti_model(seed: int = 1) -> Tuple[clustervig.ClusterViG, torch.Tensor]:
    from clustervig.preprocess import sample_photographs, transform_spec
    from clustervig.utils import calibrate_batchnorm

    torch.manual_seed(seed)
    model = clustervig.create_model("cvig_ti").eval()
    photos = sample_photographs(transform_spec(model.cfg))
    calibrate_batchnorm(model, [photos])
    return model, photos


@torch.no_grad()
def teacher_forced(model: clustervig.ClusterViG, x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    inputs: List[Tuple[object, torch.Tensor]] = []
    hooks = [d.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0].flatten(2).transpose(1, 2).clone())))
             for d in model.degc_modules()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()

    def decide(t, norm16, km16, knn16, mod):
        xn = l2_normalize(t.half() if norm16 else t)
        labels = kmeans(xn.half() if km16 else xn.float(), mod.clusters, mod.kmeans.iters)
        idx, _ = knn_masked(xn.half() if knn16 else xn.float(), labels, mod.k)
        return labels.numpy(), idx.numpy()

    rows: Dict[str, List[Tuple[float, float]]] = {v: [] for v in PIECE_VARIANTS}
    for mod, t in inputs:
        lab32, idx32 = decide(t, 0, 0, 0, mod)
        t16 = t.half().float()  # the fc1 conv's output is FP16 in the FP16 graph
        for name, flags in PIECE_VARIANTS.items():
            lab, idx = decide(t16, *flags, mod)
            rows[name].append((float((lab == lab32).mean()), neighbor_agreement(idx32, idx)))
    return {name: {"labels_mean": float(np.mean([r[0] for r in v])), "labels_min_block": float(min(r[0] for r in v)),
                   "neighbours_mean": float(np.mean([r[1] for r in v])),
                   "neighbours_min_block": float(min(r[1] for r in v))} for name, v in rows.items()}


def end_to_end(model: clustervig.ClusterViG, x: torch.Tensor, work: Path) -> Dict[str, Dict[str, float]]:
    export_onnx(model, work / "fp32.onnx", BatchSpec(1, 64, max(64, x.shape[0])))
    ref = OrtModel(work / "fp32.onnx").run(x.numpy())
    out = {}
    for islands in GRAPH_ISLANDS:
        emu = emulate_fp16(convert_fp16(onnx.load(str(work / "fp32.onnx")), islands))
        r = compare(ref, OrtModel(emu).run(x.numpy()))
        out[",".join(islands) or "none"] = {k: r[k] for k in ("cosine_mean", "cosine_min", "top1_agreement",
                                                              "label_agreement", "neighbor_agreement")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fp16_islands", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    digits, dx = digits_model()
    ti, tx = ti_model()
    res = {"machine": machine(),
           "teacher_forced": {"cvig_digits (trained, 360 scans)": teacher_forced(digits, dx),
                              "cvig_ti (random weights, 4 photos)": teacher_forced(ti, tx)}}
    with tempfile.TemporaryDirectory() as d:
        res["end_to_end_digits"] = end_to_end(digits, dx, Path(d))
    path = write_json("fp16_islands_cpu", res)
    lines = [
        "## FP16 graph: which FP32 islands (CPU, FP16 rounding emulated)",
        "",
        f"`python -m bench.fp16_islands` — {res['machine']['date']}. Agreement with the all-FP32 decisions.",
        "",
        "Teacher-forced: each DEGC gets the FP32 model's own input, rounded to FP16 (as the FP16 fc1 conv delivers it);",
        "the named pieces run in FP32, the rest in FP16. Mean over blocks (worst block in brackets).",
        "",
        "| model | FP32 islands | k-means labels | k-NN neighbours |",
        "|---|---|---:|---:|",
    ]
    for model_name, rows in res["teacher_forced"].items():
        for v, r in rows.items():
            lines.append(f"| {model_name} | {v} | {r['labels_mean'] * 100:.2f}% ({r['labels_min_block'] * 100:.2f}%) | "
                         f"{r['neighbours_mean'] * 100:.2f}% ({r['neighbours_min_block'] * 100:.2f}%) |")
    lines += ["", "End to end, trained digits model, FP16 graph with per-op FP16 rounding vs the FP32 graph:", "",
              "| FP32 islands | logit cosine mean | cosine min | top-1 | labels | neighbours |",
              "|---|---:|---:|---:|---:|---:|"]
    for v, r in res["end_to_end_digits"].items():
        lines.append(f"| {v} | {r['cosine_mean']:.5f} | {r['cosine_min']:.4f} | {r['top1_agreement'] * 100:.1f}% | "
                     f"{r['label_agreement'] * 100:.2f}% | {r['neighbor_agreement'] * 100:.2f}% |")
    update_section("fp16-islands", "\n".join(lines))
    print(f"wrote {path} and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
