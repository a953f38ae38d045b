"""Wall time of `cvig-export --model cvig_ti --fp16` on this machine (with validation).

    python -m bench.export_time [--model cvig_ti] [--repeats 3]

Runs the real command line in a subprocess (fresh interpreter, imports
included) and records the median; writes bench/results/export_cpu.json and
the "export" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, summary, update_section, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.export_time", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cvig_ti")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    times, report = [], None
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "clustervig.export.cli", "--model", args.model, "--fp16", "-o", d]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
            report = json.loads((Path(d) / "report.json").read_text())
    s = summary(times)
    res = {"model": args.model, "command": f"cvig-export --model {args.model} --fp16 -o OUT", "machine": machine(),
           "wall": s, "load_before": load_before, "stage_seconds_last_run": report["timings_s"],
           "nodes": {k: v.get("nodes") for k, v in report["artifacts"].items()},
           "validation_photos": report["validation"]["results"]["photos"]}
    path = write_json("export_cpu", res)
    m = res["machine"]
    val = res["validation_photos"]
    lines = [
        f"## Export time: `cvig-export --model {args.model} --fp16` (CPU)",
        "",
        f"`python -m bench.export_time` — whole command in a fresh process (imports, random-weight model with BN "
        f"calibration, FP32 export, FP16 pass, validation on photos and random inputs); {m['cpu_count']} CPU cores "
        f"(load average {res['load_before']:.1f} before the runs: other work on the machine inflates the times), "
        f"torch {m['torch']}, {m['date']}.",
        "",
        "| median s | min s | max s | runs | FP32 nodes | FP16 nodes |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {s['median_s']:.1f} | {s['min_s']:.1f} | {s['max_s']:.1f} | {s['n']} | {res['nodes'].get('fp32')} | {res['nodes'].get('fp16')} |",
        "",
        "Stages of the last run (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_seconds_last_run"].items()),
        "",
        "Validation of that run on 4 photographs (random weights). Random-weight k-means has no cluster structure, so",
        "FP16 rounding flips decisions that compound over 12 blocks; `fp16-emulated` rounds every op as a GPU would",
        "(ONNX Runtime's CPU FP16 run computes most nodes in FP32). For FP16 on a trained model see the FP16-islands section.",
        "",
        "| comparison | max abs Δ | cosine min | top-1 | k-means labels | k-NN neighbours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, r in val.items():
        lines.append(f"| {k} | {r['max_abs_diff']:.2e} | {r['cosine_min']:.4f} | {r['top1_agreement'] * 100:.0f}% | "
                     f"{r.get('label_agreement', float('nan')) * 100:.2f}% | {r.get('neighbor_agreement', float('nan')) * 100:.2f}% |")
    update_section("export", "\n".join(lines))
    print(f"median {s['median_s']:.1f}s over {s['n']} runs; wrote {path} and BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
