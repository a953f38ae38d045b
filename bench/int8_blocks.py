"""Where INT8 changes ClusterViG's graph: per-block k-means label and k-NN neighbour agreement with FP32.

    python -m bench.int8_blocks [--model cvig_ti] [--methods max,entropy,percentile]

The model (random weights, BatchNorm statistics from the photographs, as in
``bench.fp16_islands``) is exported in FP32 and calibrated (this package's
backend: ONNX Runtime's calibrators, residual-Add placement) on twelve
scikit-image photographs and their mirror images; it is then run on four
other photographs. Two measurements per block, against the FP32 graph:

* teacher-forced: only that block's fc1 convolution (the one that feeds the
  DEGC) is quantized, everything before it stays FP32, so the block's k-means
  and k-NN see exactly what INT8 rounding of their input does, free of the
  changes INT8 made upstream;
* end to end: the whole INT8 graph, where each block also inherits what the
  blocks before it changed.

Writes bench/results/int8_blocks.json and the "int8-blocks" section of BENCHMARKS.md.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import onnx
import torch

from .common import machine, parser, publish

CALIB_PHOTOS = ("camera", "cat", "hubble_deep_field", "immunohistochemistry", "moon", "page", "text", "brick",
                "grass", "gravel", "colorwheel", "coins")
EVAL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _agreement(ref: Dict[str, np.ndarray], out: Dict[str, np.ndarray], pre: str):
    from clustervig.export.validate import neighbor_agreement

    labels = float((ref[f"{pre}/labels"] == out[f"{pre}/labels"]).mean())
    return labels, neighbor_agreement(ref[f"{pre}/neighbors"], out[f"{pre}/neighbors"])


def int8_block_rows(g32: onnx.ModelProto, calib: np.ndarray, x: np.ndarray, spec: Dict, depth: int,
                    methods: Sequence[str]) -> List[Dict]:
    """For each method: calibrate on ``calib``, then per block the teacher-forced and end-to-end label and
    neighbour agreement with the FP32 graph on ``x``, and the end-to-end logit agreement."""
    from clustervig.calib import array_batches, collect_ranges, quantize_qdq
    from clustervig.export.validate import OrtModel, compare

    ref = OrtModel(g32).run(x)
    blocks = [f"blocks.{i}.grapher.degc" for i in range(depth)]
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        ranges = collect_ranges(g32, array_batches(calib, spec, 8), method)
        full = OrtModel(quantize_qdq(g32, ranges)).run(x)
        whole = compare(ref, full)
        per_block = []
        for i, pre in enumerate(blocks):
            forced = quantize_qdq(g32, ranges, residual=False, convs={f"blocks.{i}.grapher.fc1.0/Conv"})
            tf = _agreement(ref, OrtModel(forced).run(x), pre)
            e2e = _agreement(ref, full, pre)
            per_block.append({"block": i, "teacher_forced_labels": tf[0], "teacher_forced_neighbours": tf[1],
                              "end_to_end_labels": e2e[0], "end_to_end_neighbours": e2e[1]})
        rows.append({"method": method, "seconds": round(time.perf_counter() - t0, 1), "blocks": per_block,
                     "logits": {k: whole[k] for k in ("cosine_mean", "cosine_min", "top1_agreement")}})
        print(f"[int8-blocks] {method}: end-to-end cosine {whole['cosine_mean']:.4f}, teacher-forced labels "
              + " ".join(f"{b['teacher_forced_labels'] * 100:.0f}" for b in per_block), flush=True)
    return rows


def run(name: str, methods: Sequence[str], seed: int = 1) -> Dict:
    import clustervig
    from clustervig.export.onnx_export import BatchSpec, export_onnx
    from clustervig.preprocess import sample_photographs, transform_spec
    from clustervig.utils import calibrate_batchnorm

    torch.manual_seed(seed)
    model = clustervig.create_model(name).eval()
    spec = transform_spec(model.cfg)
    calib = sample_photographs(spec, CALIB_PHOTOS)
    calib = torch.cat([calib, calib.flip(-1)]).numpy()
    x = sample_photographs(spec, EVAL_PHOTOS)
    calibrate_batchnorm(model, [torch.from_numpy(calib), x])
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        export_onnx(model, fp32, BatchSpec(1, 8, 32))
        rows = int8_block_rows(onnx.load(str(fp32)), calib, x.numpy(), spec, model.cfg.depth, methods)
    return {"machine": machine(), "model": name, "seed": seed, "calibration": list(CALIB_PHOTOS) + ["(mirrored)"],
            "evaluation": list(EVAL_PHOTOS), "rows": rows}


def markdown(res: Dict) -> str:
    m = res["machine"]
    lines = [
        f"## INT8 block by block: `{res['model']}` (random weights) calibrated on photographs",
        "",
        f"`python -m bench.int8_blocks` — {m['date']}. Calibration: {len(res['calibration']) - 1} scikit-image "
        f"photographs and their mirror images; evaluation: {', '.join(res['evaluation'])}. Agreement of each block's "
        "k-means labels and k-NN neighbour sets with the FP32 graph, in %: teacher-forced (only that block's fc1 "
        "convolution in INT8, FP32 before it) / end to end (the whole INT8 graph). Random weights have no cluster "
        "structure, so their decisions flip at the slightest rounding: read the columns against each other and "
        "the blocks against each other, not as a trained model's figures.",
        "",
    ]
    for r in res["rows"]:
        lg = r["logits"]
        lines += [f"**{r['method']}** (end-to-end logit cosine mean {lg['cosine_mean']:.4f}, min {lg['cosine_min']:.4f}, "
                  f"top-1 agreement {lg['top1_agreement'] * 100:.0f} %; {r['seconds']:.0f} s)", "",
                  "| block | labels, teacher-forced | neighbours, teacher-forced | labels, end to end | "
                  "neighbours, end to end |", "|---:|---:|---:|---:|---:|"]
        for b in r["blocks"]:
            lines.append(f"| {b['block']} | {b['teacher_forced_labels'] * 100:.1f} | {b['teacher_forced_neighbours'] * 100:.1f} | "
                         f"{b['end_to_end_labels'] * 100:.1f} | {b['end_to_end_neighbours'] * 100:.1f} |")
        tf = [b["teacher_forced_labels"] for b in r["blocks"]]
        e2e = [b["end_to_end_labels"] for b in r["blocks"]]
        lines += ["", f"Mean over blocks: labels {np.mean(tf) * 100:.1f} % teacher-forced, {np.mean(e2e) * 100:.1f} % "
                      f"end to end; worst block teacher-forced: {int(np.argmin(tf))} ({min(tf) * 100:.1f} %).", ""]
    return "\n".join(lines).rstrip()


def main(argv=None) -> int:
    ap = parser("python -m bench.int8_blocks", __doc__)
    ap.add_argument("--model", default="cvig_ti")
    ap.add_argument("--methods", default="max,entropy,percentile")
    args = ap.parse_args(argv)
    import clustervig
    from clustervig.calib import METHODS

    methods = [m for m in args.methods.split(",") if m]
    if args.model not in clustervig.list_models():
        raise SystemExit(f"unknown model {args.model!r}; choose from {clustervig.list_models()}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    publish("int8_blocks", "int8-blocks", run(args.model, methods), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
