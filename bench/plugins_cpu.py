"""The plugin kernels on a CPU: plugin graph vs pure graph, kernel path vs static form, one DEGC's pieces.

    python -m bench.plugins_cpu [--models cvig_nano,cvig_ti] [--batches 1,8] [--repeats 7]

Part 1, whole model, batch latency: ONNX Runtime on the pure FP32 graph vs the
plugin graph (its Cvig* ops on ``libcvig_kernels_host.so``), and PyTorch's
static form vs the same form on the kernels (``set_kernels(True)``). Part 2,
one DEGC of the model (its N, C, kappa, T, K): the host kernels vs the PyTorch
ops they replace (unrolled k-means, masked N x N top-k, gather + max). All
variants of one model run interleaved in one process; medians with min-max.

These are CPU figures: they show what a CPU user of the plugin graph pays,
not what the CUDA kernels do on a GPU (``python -m bench.gpu_acceptance``).
Writes bench/results/plugins_cpu.json and the "plugins-cpu" section of BENCHMARKS.md.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from .common import ints, machine, ms, parser, publish, summary, time_interleaved

MODEL_BACKENDS = ("ort-fp32", "ort-plugins", "torch-static", "torch-kernels")


def model_rows(names: Sequence[str], batches: Sequence[int], repeats: int) -> List[Dict]:
    from .models import build_model, runners, tile

    rows = []
    for name in names:
        model, photos = build_model(name, {})
        with tempfile.TemporaryDirectory() as tmp:
            run = runners(name, model, photos, MODEL_BACKENDS, Path(tmp), max(batches))
            for b in batches:
                x = tile(photos, b)
                with torch.inference_mode():
                    times = time_interleaved({k: (lambda f=f: f(x)) for k, f in run.items()}, repeats)
                for backend, ts in times.items():
                    rows.append({"model": name, "batch": b, "backend": backend, **summary(ts)})
                    print(f"[plugins-cpu] {name:<10} b={b:<3} {backend:<14} {ms(summary(ts))} ms", flush=True)
    return rows


def degc_rows(names: Sequence[str], batches: Sequence[int], repeats: int) -> List[Dict]:
    """The first DEGC's shape of each model: host kernels vs the PyTorch ops of the static form."""
    import clustervig
    from clustervig.graph import gather_max, kmeans, knn_masked, l2_normalize
    from clustervig.plugins import kernels as K

    lib = K.host_library()
    rows = []
    for name in names:
        cfg = clustervig.get_config(name)
        n, c, kappa, t, kk = cfg.tokens, cfg.dim, cfg.clusters, cfg.kmeans_iters, cfg.neighbors[0]
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x = torch.randn(b, n, c, generator=g)
            xn = l2_normalize(x)
            xn_np, x_np = xn.numpy(), x.numpy()
            lab_np, _ = K.kmeans(xn_np, kappa, t, lib=lib)
            lab = torch.from_numpy(lab_np).long()
            idx_np, _ = K.partitioned_knn(xn_np, lab_np, kk, lib=lib)
            idx = torch.from_numpy(idx_np).long()
            fns = {
                "kmeans/kernel": lambda: K.kmeans(xn_np, kappa, t, lib=lib),
                "kmeans/torch": lambda: kmeans(xn, kappa, t),
                "knn/kernel": lambda: K.partitioned_knn(xn_np, lab_np, kk, lib=lib),
                "knn/torch-masked": lambda: knn_masked(xn, lab, kk),
                "gather_max_rel/kernel": lambda: K.gather_max_rel(x_np, idx_np, lib=lib),
                "gather_max_rel/torch": lambda: gather_max(x, idx) - x,
            }
            with torch.inference_mode():
                times = time_interleaved(fns, repeats)
            for key, ts in times.items():
                op, impl = key.split("/")
                rows.append({"model": name, "batch": b, "N": n, "C": c, "clusters": kappa, "K": kk, "op": op,
                             "impl": impl, **summary(ts)})
    return rows


def run(names: Sequence[str], batches: Sequence[int], repeats: int) -> Dict:
    return {"machine": machine(), "repeats": repeats, "models": model_rows(names, batches, repeats),
            "degc": degc_rows(names, batches, repeats)}


def _ratio(a: Dict, b: Dict) -> str:
    return f"{b['median_s'] / a['median_s']:.2f}x"


def markdown(res: Dict) -> str:
    m = res["machine"]
    lines = [
        "## Plugin kernels on the CPU: plugin graph vs pure graph, kernel path vs static form",
        "",
        f"`python -m bench.plugins_cpu` — {m['date']}, {m['cpu_count']} CPU cores, torch {m['torch']}, "
        f"onnxruntime {m.get('onnxruntime', '?')}; milliseconds per batch, median (min–max) of {res['repeats']} "
        "interleaved runs. The plugin graph's Cvig* ops and `set_kernels(True)` run `libcvig_kernels_host.so`, "
        "the host build of the CUDA kernels' source (images over threads, AVX2 where the CPU has it, bit-identical "
        "to the CUDA build); the plugin graph also pays onnxruntime-extensions' Python-op bridge (inputs and outputs "
        "cross into Python at every Cvig* node). Speed-up > 1 means the kernels are faster.",
        "",
        "| model | batch | ORT pure FP32 | ORT plugin graph | speed-up | PyTorch static | PyTorch kernels | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["model"], r["batch"], r["backend"]): r for r in res["models"]}
    for model, b in dict.fromkeys((r["model"], r["batch"]) for r in res["models"]):
        get = lambda k: by[(model, b, k)]  # noqa: E731
        lines.append(f"| {model} | {b} | {ms(get('ort-fp32'))} | {ms(get('ort-plugins'))} | "
                     f"{_ratio(get('ort-plugins'), get('ort-fp32'))} | {ms(get('torch-static'))} | "
                     f"{ms(get('torch-kernels'))} | {_ratio(get('torch-kernels'), get('torch-static'))} |")
    lines += ["", "One DEGC (the model's first block shape), host kernel vs the PyTorch ops it replaces:", "",
              "| model (N, C, κ, K) | batch | op | kernel ms | PyTorch ms | speed-up |", "|---|---:|---|---:|---:|---:|"]
    dg = {(r["model"], r["batch"], r["op"], r["impl"]): r for r in res["degc"]}
    for r in res["degc"]:
        if r["impl"] != "kernel":
            continue
        other = next(v for (mo, b, op, impl), v in dg.items() if (mo, b, op) == (r["model"], r["batch"], r["op"])
                     and impl != "kernel")
        lines.append(f"| {r['model']} ({r['N']}, {r['C']}, {r['clusters']}, {r['K']}) | {r['batch']} | {r['op']} | "
                     f"{ms(r)} | {ms(other)} | {_ratio(r, other)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.plugins_cpu", __doc__)
    ap.add_argument("--models", default="cvig_nano,cvig_ti")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    names = [s for s in args.models.split(",") if s]
    import clustervig

    bad = [s for s in names if s not in clustervig.list_models()]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {clustervig.list_models()}")
    res = run(names, ints(args.batches), args.repeats)
    publish("plugins_cpu", "plugins-cpu", res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
