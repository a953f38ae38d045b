"""CPU latency of the static vs reference forms of a ClusterViG in PyTorch.

    python -m bench.forms [--model cvig_ti] [--batches 1,32] [--repeats 7]

Both forms run the same weights on the same images, interleaved, in one
process; the figure is the median over repeats. Writes
bench/results/forms_cpu.json and the "forms" section of BENCHMARKS.md.
"""
from __future__ import annotations

import torch

import clustervig
from clustervig.utils import calibrate_batchnorm

from .common import machine, ms, parser, publish, summary, time_interleaved


def run(model_name: str, batches, repeats: int) -> dict:
    torch.manual_seed(0)
    model = clustervig.create_model(model_name)
    size = model.cfg.img_size
    calibrate_batchnorm(model, [torch.randn(4, 3, size, size)])
    static = model
    reference = clustervig.create_model(model_name, form="reference")
    reference.load_state_dict(static.state_dict())
    reference.eval()
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size)
        with torch.no_grad():
            diff = (static(x) - reference(x)).abs().max().item()
            times = time_interleaved(
                {"static": lambda: static(x), "reference": lambda: reference(x)},
                repeats=repeats,
                warmup=1,
            )
        s, r = summary(times["static"]), summary(times["reference"])
        rows.append({
            "batch": b,
            "static": s,
            "reference": r,
            "speedup_static_vs_reference": r["median_s"] / s["median_s"],
            "max_abs_diff_logits": diff,
        })
        print(f"batch {b:>3}: static {s['median_s']*1e3:8.1f} ms  reference {r['median_s']*1e3:8.1f} ms  "
              f"ratio {r['median_s']/s['median_s']:.2f}x  max|dlogits| {diff:.1e}")
    return {"model": model_name, "machine": machine(), "rows": rows}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"## PyTorch forms: static vs reference ({res['model']}, CPU)",
        "",
        "`python -m bench.forms` — eager PyTorch, FP32, "
        f"{m['cpu_count']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), {m['date']}.",
        "Median (min–max) latency over interleaved repeats; same weights and images for both forms.",
        "",
        "| batch | static (ms) | reference (ms) | reference / static | max abs Δ logits |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        s, f = r["static"], r["reference"]
        lines.append(
            f"| {r['batch']} | {ms(s)} | {ms(f)} | "
            f"{r['speedup_static_vs_reference']:.2f}× | {r['max_abs_diff_logits']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.forms", __doc__)
    ap.add_argument("--model", default="cvig_ti", choices=clustervig.list_models())
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    res = run(args.model, [int(b) for b in args.batches.split(",")], args.repeats)
    publish("forms_cpu", "forms", res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
