"""Whole model on a CUDA GPU: PyTorch eager FP32, eager FP16, and CUDA-graph replay, ClusterViG vs ViG baseline.

    python -m bench.gpu [--sizes ti,s] [--batches 1,8,32,64,128,256] [--repeats 20]

Runs only where ``torch.cuda.is_available()``; elsewhere it records why it did
not run. Times with CUDA events, interleaved repeats, medians. The plugin
kernels have their own benchmark (``python plugins/bench_kernels.py``, needs
``cmake --build build/plugins``); its JSON is picked up into the same section
when present. Results are tagged with the device name:
bench/results/gpu.json and the "gpu" section of BENCHMARKS.md.
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Sequence

import torch

from . import common
from .common import ints, machine, parser, publish
from .models import build_model, variants

MODES = ("eager-fp32", "eager-fp16", "cudagraph-fp16")


def cuda_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out[name].append(a.elapsed_time(b) / 1e3)
    return out


def run(sizes: Sequence[str], batches: Sequence[int], repeats: int) -> Dict:
    if not torch.cuda.is_available():
        return {"machine": machine(), "skipped": "no CUDA device on this machine (torch.cuda.is_available() is False)"}
    dev = torch.device("cuda")
    rows = []
    for size in sizes:
        models = {}
        for label, (variant, overrides) in variants(size).items():
            m, _ = build_model(variant, overrides)
            m32 = m.to(dev)
            models[label] = (m32, _half_copy(m32))
        for b in batches:
            fns = {}
            for label, (m32, m16) in models.items():
                px = m32.cfg.img_size
                x32 = torch.randn(b, 3, px, px, device=dev)
                x16 = x32.half()
                try:
                    fns[f"{label}/eager-fp32"] = (lambda m=m32, x=x32: _infer(m, x))
                    fns[f"{label}/eager-fp16"] = (lambda m=m16, x=x16: _infer(m, x))
                    fns[f"{label}/cudagraph-fp16"] = common.cuda_graphed(m16, x16)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({"size": size, "model": label, "batch": b, "oom": True})
            times = cuda_times(fns, repeats)
            for key, ts in times.items():
                label, mode = key.split("/", 1)
                med = statistics.median(ts)
                rows.append({"size": size, "model": label, "mode": mode, "batch": b, "median_s": med,
                             "min_s": min(ts), "max_s": max(ts), "throughput_img_s": b / med})
                print(f"[gpu] {label:<8} {mode:<15} b={b:<4} {med * 1e3:8.2f} ms  {b / med:9.1f} img/s", flush=True)
            del fns
            torch.cuda.empty_cache()
    kernels = sorted(common.RESULTS.glob("kernels_*.json"))
    return {"machine": machine(), "device": torch.cuda.get_device_name(0), "repeats": repeats, "rows": rows,
            "kernel_results": [k.name for k in kernels]}


def _half_copy(m: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(m).half()


def _infer(m, x):
    with torch.inference_mode():
        return m(x)


def markdown(res: Dict) -> str:
    if "skipped" in res:
        return ("## GPU: PyTorch CUDA (eager, FP16, CUDA graphs) and plugin kernels\n\n"
                f"Not measured in this run ({res['machine']['date']}): {res['skipped']}. "
                "`python -m bench` fills this section on a machine with a GPU (and `python plugins/bench_kernels.py` "
                "times the plugin kernels against the PyTorch ops they replace).")
    rows = [r for r in res["rows"] if not r.get("oom")]
    batches = sorted({r["batch"] for r in rows})
    lines = [
        f"## GPU: PyTorch CUDA on {res['device']}",
        "",
        f"`python -m bench.gpu` — {res['machine']['date']}, torch {res['machine']['torch']}; images per second, "
        f"median of {res['repeats']} CUDA-event timings.",
        "",
        "| model | mode | " + " | ".join(f"b = {b}" for b in batches) + " |",
        "|---|---|" + "---:|" * len(batches),
    ]
    by = {(r["model"], r["mode"], r["batch"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in MODES:
            cells = [f"{by[(model, mode, b)]['throughput_img_s']:.1f}" if (model, mode, b) in by else "OOM"
                     for b in batches]
            lines.append(f"| {model} | {mode} | " + " | ".join(cells) + " |")
    if res.get("kernel_results"):
        lines += ["", "Plugin kernel timings: " + ", ".join(f"`bench/results/{k}`" for k in res["kernel_results"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.gpu", __doc__)
    ap.add_argument("--sizes", default="ti,s")
    ap.add_argument("--batches", default="1,8,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    res = run([s for s in args.sizes.split(",") if s], ints(args.batches), args.repeats)
    publish("gpu", "gpu", res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
