"""Whole-model throughput: ClusterViG vs an isotropic ViG baseline built from the same blocks.

    python -m bench.models [--sizes ti,s] [--batches 1,8,32] [--grids 14,28,56] [--repeats 3]

Part 1, throughput vs batch (the layout of the paper's Table VI), for each size
(cvig_ti, cvig_s) and its ViG baseline — the same config with kappa = 1 and no
global update, so every block builds ViG's full-image k-NN graph; width, depth,
K schedule, FFN and stem are identical — on every backend:

* ``torch-reference``: PyTorch eager, the reference form (Algorithm 2 loops over partitions);
* ``torch-static``: PyTorch eager, the static (exported) form with masked top-k;
* ``ort-fp32`` / ``ort-fp16`` / ``ort-int8``: ONNX Runtime CPU on the exported graphs
  (FP16 with the default FP32 islands; INT8 Q/DQ with max calibration on 4 photographs);
* ``ort-plugins``: the plugin graph, its Cvig* ops on the host build of the plugin kernels;
* ``torch-kernels`` (not in the default set; ``bench.plugins_cpu``): the static form on the kernels.

Part 2, tokens: batch 1 at grid 14/28/56 (N = 196/784/3136, images 224/448/896)
for cvig_ti with the masked and the padded k-NN layout and its ViG baseline, in
PyTorch (static form) and ONNX Runtime FP32.

All models of one size run interleaved (A B A B ...) in one process, so machine
noise hits them alike; figures are medians with min-max over the repeats.
Weights are random (BatchNorm statistics set on photographs): speed does not
depend on them (k-means runs a fixed number of iterations). Writes
bench/results/models_cpu.json and the "models" and "tokens" sections of BENCHMARKS.md.
"""
from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import onnx
import torch

import clustervig
from clustervig.preprocess import sample_photographs, transform_spec
from clustervig.utils import calibrate_batchnorm

from .common import ints, machine, ms, parser, publish, summary, time_interleaved, update_section

VIG = {"clusters": 1, "global_update": False}
BACKENDS = ("torch-reference", "torch-static", "ort-fp32", "ort-fp16", "ort-int8", "ort-plugins")
TOKEN_BACKENDS = ("torch-static", "ort-fp32")

Runner = Callable[[np.ndarray], object]


def variants(size: str) -> Dict[str, Tuple[str, Dict]]:
    """Model label -> (registry name, overrides) for one size: ClusterViG and its ViG baseline."""
    return {f"cvig_{size}": (f"cvig_{size}", {}), f"vig_{size}": (f"cvig_{size}", dict(VIG))}


def build_model(variant: str, overrides: Dict, seed: int = 0) -> Tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = clustervig.create_model(variant, **overrides)
    photos = sample_photographs(transform_spec(model.cfg))
    calibrate_batchnorm(model, [photos])
    return model.eval(), photos


def runners(label: str, model: torch.nn.Module, photos: torch.Tensor, backends: Sequence[str], workdir: Path,
            max_batch: int) -> Dict[str, Runner]:
    """One callable per backend, each taking a float32 [B, 3, S, S] array."""
    from clustervig.calib import array_batches, collect_ranges, quantize_qdq
    from clustervig.export.fp16 import DEFAULT_FP32_ISLANDS, convert_fp16
    from clustervig.export.onnx_export import BatchSpec, export_onnx
    from clustervig.export.plugin_graph import to_plugin_graph
    from clustervig.runtime import OrtSession

    out: Dict[str, Runner] = {}
    for b in backends:
        if b == "torch-reference":
            ref = copy.deepcopy(model)
            ref.set_form("reference")
            out[b] = lambda x, m=ref: m(torch.from_numpy(x))
        elif b == "torch-static":
            out[b] = lambda x, m=model: m(torch.from_numpy(x))
        elif b == "torch-kernels":
            fast = copy.deepcopy(model).set_kernels(True)
            out[b] = lambda x, m=fast: m(torch.from_numpy(x))
    onnx_backends = [b for b in backends if b.startswith("ort-")]
    if not onnx_backends:
        return out
    fp32_path = workdir / f"{label}_fp32.onnx"
    export_onnx(model, fp32_path, BatchSpec(1, min(8, max_batch), max_batch))
    paths = {"ort-fp32": fp32_path}
    g32 = onnx.load(str(fp32_path))
    if "ort-fp16" in onnx_backends:
        paths["ort-fp16"] = workdir / f"{label}_fp16.onnx"
        onnx.save(convert_fp16(g32, DEFAULT_FP32_ISLANDS, False), str(paths["ort-fp16"]))
    if "ort-int8" in onnx_backends:
        spec = transform_spec(model.cfg)
        ranges = collect_ranges(g32, array_batches(photos.numpy(), spec, batch=4), "max")
        paths["ort-int8"] = workdir / f"{label}_int8.onnx"
        onnx.save(quantize_qdq(g32, ranges), str(paths["ort-int8"]))
    if "ort-plugins" in onnx_backends:
        paths["ort-plugins"] = workdir / f"{label}_plugins.onnx"
        onnx.save(to_plugin_graph(g32)[0], str(paths["ort-plugins"]))
    for b in onnx_backends:
        sess = OrtSession(paths[b])
        out[b] = lambda x, s=sess: s.infer(x)
    return out


def tile(photos: torch.Tensor, b: int) -> np.ndarray:
    reps = math.ceil(b / len(photos))
    return np.ascontiguousarray(photos.repeat(reps, 1, 1, 1)[:b].numpy(), dtype=np.float32)


def throughput_rows(sizes: Sequence[str], batches: Sequence[int], backends: Sequence[str], repeats: int,
                    workdir: Path) -> List[Dict]:
    rows: List[Dict] = []
    for size in sizes:
        t0 = time.perf_counter()
        fns_by_model: Dict[str, Dict[str, Runner]] = {}
        photos = None
        for label, (variant, overrides) in variants(size).items():
            model, photos = build_model(variant, overrides)
            fns_by_model[label] = runners(label, model, photos, backends, workdir, max(batches))
        print(f"[models] {size}: built {len(fns_by_model)} models x {len(backends)} backends "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)
        for b in batches:
            x = tile(photos, b)
            fns = {f"{label}/{bk}": (lambda f=f: f(x)) for label, d in fns_by_model.items() for bk, f in d.items()}
            with torch.inference_mode():
                times = time_interleaved(fns, repeats=repeats, warmup=1)
            for key, samples in times.items():
                label, bk = key.split("/", 1)
                s = summary(samples)
                rows.append({"size": size, "model": label, "family": label.split("_")[0], "backend": bk, "batch": b,
                             **s, "throughput_img_s": b / s["median_s"]})
                print(f"[models] {label:<8} {bk:<16} b={b:<3} {ms(s)} ms  {b / s['median_s']:8.1f} img/s", flush=True)
    return rows


def token_rows(grids: Sequence[int], repeats: int, workdir: Path, size: str = "ti") -> List[Dict]:
    rows: List[Dict] = []
    for grid in grids:
        n = grid * grid
        img = 16 * grid
        base = {"img_size": img, "grid": grid}
        clusters = clustervig.get_config(f"cvig_{size}").clusters
        cap = math.ceil(1.25 * n / clusters)
        models = {
            f"cvig_{size}-masked": (f"cvig_{size}", dict(base, knn="masked")),
            f"cvig_{size}-padded": (f"cvig_{size}", dict(base, knn="padded", capacity=cap)),
            f"vig_{size}": (f"cvig_{size}", dict(base, knn="masked", **VIG)),
        }
        if clustervig.get_config(f"cvig_{size}", **base).knn_mode == "padded":
            # what knn="auto" picks above N = 1024: padded with the exact capacity P = N (kappa N^2 similarities)
            models[f"cvig_{size}-padded-exact"] = (f"cvig_{size}", dict(base, knn="padded"))
        fns = {}
        photos = None
        t0 = time.perf_counter()
        for label, (variant, overrides) in models.items():
            model, photos = build_model(variant, overrides)
            for bk, f in runners(f"{label}_g{grid}", model, photos, TOKEN_BACKENDS, workdir, 1).items():
                fns[f"{label}/{bk}"] = f
        print(f"[tokens] N={n}: built in {time.perf_counter() - t0:.0f}s", flush=True)
        x = tile(photos, 1)
        calls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
        with torch.inference_mode():
            times = time_interleaved(calls, repeats=repeats, warmup=1)
        for key, samples in times.items():
            label, bk = key.split("/", 1)
            s = summary(samples)
            capacity = cap if label.endswith("-padded") else (n if label.endswith("-padded-exact") else None)
            rows.append({"tokens": n, "grid": grid, "img_size": img, "model": label, "backend": bk,
                         "capacity": capacity, **s})
            print(f"[tokens] N={n:<5} {label:<16} {bk:<13} {ms(s)} ms", flush=True)
    return rows


def ratio_table(rows: List[Dict], key: str) -> Dict[Tuple, float]:
    """CViG / ViG throughput (> 1: ClusterViG is faster), per (size, backend, batch)."""
    by = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    out = {}
    for r in rows:
        if r["family"] != "cvig":
            continue
        vig = by.get((r["model"].replace("cvig_", "vig_"), r["backend"], r["batch"]))
        if vig:
            out[(r["size"], r["backend"], r["batch"])] = vig[key] / r[key]
    return out


def markdown_models(res: Dict) -> str:
    m, rows = res["machine"], res["throughput"]
    batches = sorted({r["batch"] for r in rows})
    head = "| model | backend | " + " | ".join(f"b = {b}" for b in batches) + " |"
    sep = "|---|---|" + "---:|" * len(batches)
    lines = [
        "## Whole model: throughput vs batch, ClusterViG vs ViG baseline (CPU)",
        "",
        f"`python -m bench.models` — {m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m.get('onnxruntime', '-')}, {m['date']}. Images per second: median (range) over "
        f"{res['repeats']} interleaved repeats. `vig_*` is the same network with κ = 1 and no global "
        "update: ViG's full-image k-NN in every block, matched width and depth.",
        "",
        head,
        sep,
    ]
    by = {(r["model"], r["backend"], r["batch"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for bk in dict.fromkeys(r["backend"] for r in rows if r["model"] == model):
            cells = [_img_s(by[(model, bk, b)]) if (model, bk, b) in by else "–" for b in batches]
            lines.append(f"| {model} | {bk} | " + " | ".join(cells) + " |")
    ratios = ratio_table(rows, "median_s")
    lines += ["", "CViG / ViG throughput ratio (> 1: ClusterViG faster), same backend and batch:", "",
              "| size | backend | " + " | ".join(f"b = {b}" for b in batches) + " |", sep]
    for size in dict.fromkeys(k[0] for k in ratios):
        for bk in dict.fromkeys(k[1] for k in ratios if k[0] == size):
            cells = [f"{ratios[(size, bk, b)]:.2f}×" if (size, bk, b) in ratios else "–" for b in batches]
            lines.append(f"| {size} | {bk} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _img_s(r: Dict) -> str:
    return f"{r['batch'] / r['median_s']:.1f} ({r['batch'] / r['max_s']:.1f}–{r['batch'] / r['min_s']:.1f})"


def token_ratios(rows: List[Dict]) -> Dict[Tuple, float]:
    """ViG latency / CViG latency (> 1: ClusterViG faster), per (tokens, backend, cvig model label)."""
    vig = {(r["tokens"], r["backend"]): r["median_s"] for r in rows if r["model"].startswith("vig_")}
    return {(r["tokens"], r["backend"], r["model"]): vig[(r["tokens"], r["backend"])] / r["median_s"]
            for r in rows if r["model"].startswith("cvig_") and (r["tokens"], r["backend"]) in vig}


def markdown_tokens(res: Dict) -> str:
    rows = res["tokens"]
    ratios = token_ratios(rows)
    lines = [
        "## Whole model vs tokens: ClusterViG (masked, padded) vs ViG baseline, batch 1 (CPU)",
        "",
        f"`python -m bench.models` — cvig_{res.get('token_size', 'ti')}'s network at grids "
        f"{', '.join(str(g) for g in sorted({r['grid'] for r in rows}))} (images 16 × grid). `masked`: N×N "
        "similarity, cross-partition entries masked, top-k; `padded`: each partition gathered into capacity "
        "P = ⌈1.25 N/κ⌉, only κ·P² similarities; `padded-exact`: P = N, what `knn=\"auto\"` picks above N = 1024 "
        "(exact for any partition sizes, but κ·N² similarities). The ViG baseline runs the masked kernel with one "
        "partition. Median (min–max) ms.",
        "",
        "| N | backend | model | latency ms | ViG / this |",
        "|---:|---|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["backend"], r["model"])):
        ratio = ratios.get((r["tokens"], r["backend"], r["model"]))
        lines.append(f"| {r['tokens']} | {r['backend']} | {r['model']} | {ms(r)} | "
                     f"{f'{ratio:.2f}×' if ratio else '1.00×'} |")
    return "\n".join(lines)


def run(sizes, batches, grids, backends, repeats: int, token_repeats: int, token_size: str = "ti") -> Dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cvig-bench-") as d:
        res = {"machine": machine(), "repeats": repeats, "token_repeats": token_repeats, "token_size": token_size,
               "throughput": throughput_rows(sizes, batches, backends, repeats, Path(d)) if sizes else [],
               "tokens": token_rows(grids, token_repeats, Path(d), token_size) if grids else []}
    res["wall_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = parser("python -m bench.models", __doc__)
    ap.add_argument("--sizes", default="ti,s", help="model sizes: ti, s, b (default: ti,s)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--grids", default="14,28,56", help="token sweep grids (N = grid^2); empty to skip")
    ap.add_argument("--token-size", default="ti", help="model size of the token sweep (default: ti)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--token-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    res = run([s for s in args.sizes.split(",") if s], ints(args.batches), ints(args.grids), backends,
              args.repeats, args.token_repeats, args.token_size)
    publish_results(res)
    return 0


def publish_results(res: Dict) -> None:
    publish("models_cpu", "models", res, markdown_models)
    if res["tokens"]:
        update_section("tokens", markdown_tokens(res))


if __name__ == "__main__":
    raise SystemExit(main())
