"""FP16 and INT8 fidelity of a trained model at the paper's resolution: cvig_photos (224 px, 14x14 tokens, 12 blocks).

    python -m bench.trained224 [--checkpoint clustervig/weights/cvig_photos.pth] [--block-images 64]

On the held-out split of the photo-patches data set (clustervig.photo_data,
regenerated from the recipe stored in the checkpoint): top-1 of PyTorch, ONNX
Runtime FP32, FP16 (ONNX Runtime, and per-op FP16 rounding emulated, with each
FP32-island set), INT8 (each calibration method, with and without the
residual-Add Q/DQ), each with top-1 agreement, logit cosine and the mean k-means
label / k-NN neighbour agreement with FP32 over the blocks, end to end. Then per
block: FP16 teacher-forced by piece (bench.fp16_islands) and INT8 teacher-forced
and end to end (bench.int8_blocks), on the first --block-images test crops.
INT8 is calibrated on 64 training crops (4 per class).

Writes bench/results/trained224.json and the "trained224" section of BENCHMARKS.md.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict

import numpy as np
import onnx
import torch

from .common import machine, parser, publish

METHODS = ("max", "entropy", "percentile")


def load(checkpoint: Path):
    import clustervig
    from clustervig.photo_data import photo_patches_split

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    recipe = ck.get("recipe") or {}
    model = clustervig.create_model("cvig_photos", pretrained=checkpoint).eval()
    cfg = model.cfg
    train, test = photo_patches_split(recipe.get("train_per_class", 64), recipe.get("test_per_class", 16),
                                      cfg.img_size, recipe.get("data_seed", 0), cfg.mean, cfg.std)
    return model, train, test, recipe, ck.get("metrics") or {}


def calibration_images(train, per_class: int = 4) -> np.ndarray:
    labels = train.labels.numpy()
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return train.images[idx].numpy()


def run(checkpoint: Path, block_images: int) -> Dict:
    from clustervig.calib import array_batches, collect_ranges, quantize_qdq
    from clustervig.export.fp16 import DEFAULT_FP32_ISLANDS, convert_fp16
    from clustervig.export.fp16_emulate import emulate_fp16
    from clustervig.export.onnx_export import BatchSpec, export_onnx
    from clustervig.export.validate import OrtModel, compare
    from clustervig.preprocess import transform_spec

    from .fp16_islands import GRAPH_ISLANDS, teacher_forced
    from .int8_blocks import int8_block_rows

    model, train, test, recipe, metrics = load(checkpoint)
    spec = transform_spec(model.cfg)
    x, y = test.images.numpy(), test.labels.numpy()
    calib = calibration_images(train)
    artifacts: Dict[str, Dict] = {}
    timings: Dict[str, float] = {}
    with torch.no_grad():
        torch_logits = np.concatenate([model(test.images[i:i + 32]).numpy() for i in range(0, len(x), 32)])

    def add(name, out, ref):
        r = compare(ref, out)
        r["top1"] = float((out["logits"].argmax(1) == y).mean())
        artifacts[name] = {k: r[k] for k in ("top1", "top1_agreement", "cosine_mean", "cosine_min", "label_agreement",
                                             "neighbor_agreement")}
        print(f"[trained224] {name:<42} top-1 {r['top1'] * 100:6.2f}%  agree {r['top1_agreement'] * 100:6.2f}%  "
              f"cos {r['cosine_mean']:.5f}  labels {r['label_agreement'] * 100:6.2f}%  "
              f"neighbours {r['neighbor_agreement'] * 100:6.2f}%", flush=True)

    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        export_onnx(model, fp32, BatchSpec(1, 32, 256))
        g32 = onnx.load(str(fp32))
        ref = OrtModel(g32).run(x)
        artifacts["pytorch fp32"] = {"top1": float((torch_logits.argmax(1) == y).mean()),
                                     "top1_agreement": float((torch_logits.argmax(1) == ref["logits"].argmax(1)).mean())}
        add("onnxruntime fp32", ref, ref)
        add("onnxruntime fp16 (default islands)", OrtModel(convert_fp16(g32)).run(x), ref)
        for islands in GRAPH_ISLANDS:
            t0 = time.perf_counter()
            add(f"fp16 emulated, islands {','.join(islands) or 'none'}",
                OrtModel(emulate_fp16(convert_fp16(g32, islands))).run(x), ref)
            timings[f"fp16 emulated {','.join(islands) or 'none'}"] = time.perf_counter() - t0
        for method in METHODS:
            t0 = time.perf_counter()
            ranges = collect_ranges(g32, array_batches(calib, spec, 8), method)
            timings[f"calibration {method}"] = time.perf_counter() - t0
            add(f"int8 {method}", OrtModel(quantize_qdq(g32, ranges)).run(x), ref)
            add(f"int8 {method}, Conv inputs only", OrtModel(quantize_qdq(g32, ranges, residual=False)).run(x), ref)
        xb = x[:block_images]
        int8_blocks = int8_block_rows(g32, calib, xb, spec, model.cfg.depth, METHODS)
    fp16_tf = teacher_forced(model, test.images[:block_images])
    return {"machine": machine(), "checkpoint": str(checkpoint), "recipe": recipe, "training": metrics,
            "test_images": int(len(x)), "block_images": int(min(block_images, len(x))),
            "calibration_images": int(len(calib)), "default_islands": list(DEFAULT_FP32_ISLANDS),
            "artifacts": artifacts, "fp16_teacher_forced": fp16_tf, "int8_blocks": int8_blocks,
            "seconds": {k: round(v, 1) for k, v in timings.items()}}


def markdown(res: Dict) -> str:
    m, r = res["machine"], res["recipe"]
    tr = res.get("training", {})
    lines = [
        "## A trained model at 224 px: `cvig_photos` (14×14 tokens, 12 blocks, κ = 4, K 9–18, G-MRGCN + GATv2)",
        "",
        f"`python -m bench.trained224` — {m['date']}. Model: dim 48, trained by `cvig train-photos` "
        f"({r.get('epochs')} epochs, {tr.get('train_images')} training crops, {tr.get('train_seconds', 0) / 60:.0f} min "
        f"on {tr.get('threads')} CPU threads; test top-1 at the end of training {tr.get('test_top1', 0) * 100:.2f} %). "
        f"Held-out split: {res['test_images']} crops from the test third of each source image; INT8 calibrated on "
        f"{res['calibration_images']} training crops. Agreement columns compare with ONNX Runtime FP32; labels and "
        "neighbours are the k-means label and k-NN neighbour-set agreement, mean over the 12 blocks, end to end.",
        "",
        "| artifact | top-1 | top-1 agreement | cosine mean | cosine min | labels | neighbours |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in res["artifacts"].items():
        cells = [f"{a['top1'] * 100:.2f}%", f"{a['top1_agreement'] * 100:.2f}%"]
        for k in ("cosine_mean", "cosine_min"):
            cells.append(f"{a[k]:.5f}" if k in a else "")
        for k in ("label_agreement", "neighbor_agreement"):
            cells.append(f"{a[k] * 100:.2f}%" if k in a else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"FP16, teacher-forced per piece (each block gets the FP32 model's own input rounded to FP16; the "
              f"named pieces in FP32), first {res['block_images']} test crops, mean over blocks (worst block):", "",
              "| FP32 islands | k-means labels | k-NN neighbours |", "|---|---:|---:|"]
    for v, t in res["fp16_teacher_forced"].items():
        lines.append(f"| {v} | {t['labels_mean'] * 100:.2f}% ({t['labels_min_block'] * 100:.2f}%) | "
                     f"{t['neighbours_mean'] * 100:.2f}% ({t['neighbours_min_block'] * 100:.2f}%) |")
    lines += ["", f"INT8 per block, first {res['block_images']} test crops: labels / neighbours in %, teacher-forced "
              "(only that block's fc1 in INT8) and end to end:", "",
              "| block | " + " | ".join(f"{r['method']} TF | {r['method']} E2E" for r in res["int8_blocks"]) + " |",
              "|---:|" + "---:|---:|" * len(res["int8_blocks"])]
    for i in range(len(res["int8_blocks"][0]["blocks"])):
        cells = []
        for row in res["int8_blocks"]:
            b = row["blocks"][i]
            cells += [f"{b['teacher_forced_labels'] * 100:.1f} / {b['teacher_forced_neighbours'] * 100:.1f}",
                      f"{b['end_to_end_labels'] * 100:.1f} / {b['end_to_end_neighbours'] * 100:.1f}"]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from clustervig.train import WEIGHTS_DIR

    ap = parser("python -m bench.trained224", __doc__)
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR / "cvig_photos.pth")
    ap.add_argument("--block-images", type=int, default=64)
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint} does not exist: train it with `cvig train-photos -o {args.checkpoint}`")
    publish("trained224", "trained224", run(args.checkpoint, args.block_images), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
