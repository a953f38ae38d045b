"""ClusterViG as a detection backbone at high resolution (issue #26): export, CPU latency, memory, FP16 fidelity.

    python -m bench.backbone [--model cvig_s] [--sizes 800x1344,512x512] [--repeats 3] [--samples 1]

Per input size, the backbone is cvig_s's network (random weights, BatchNorm set on photographs, as `cvig
export` does without a checkpoint) with the simple feature pyramid (outputs p3..p6, strides 8..64) after
its last block:

1. `cvig export --features --feature-pyramid --img-size HxW --knn padded --capacity auto --fp16 --no-gates`
   runs in a fresh process (a measurement: the gates are evaluated and any that fail are listed in the
   section, but the export publishes): its wall time and stages, the capacity P it chose (the largest partition M seen on the
   validation images x 1.25) with the overflow, and from report.json the FP32-vs-PyTorch and the FP16
   (per-op FP16 rounding emulated) vs FP32 comparison of every output map, with k-means label and k-NN
   neighbour agreement.
2. Two more graphs of the same network (Python API, same seed): the masked k-NN layout (the full N x N
   similarity, masked per partition) and the ViG baseline of bench.models (kappa = 1, no global update:
   ViG's full-image k-NN in every block, width, depth and K schedule matched).
3. ONNX Runtime CPU latency at batch 1, each graph in its own process (load, one warm-up, then --repeats
   timed runs; graphs take turns round by round), and that process's peak resident memory.
4. What a TensorRT build of the padded graph and of its plugin graph holds (export.trt_compat
   memory_summary): the largest tensors, the TopK sizes and the k-means working set.

Writes bench/results/backbone_cpu.json and the "backbone" section of BENCHMARKS.md. About 15 minutes on
2 cores for both default sizes (most of it PyTorch: the export's capacity measurement and validation).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import common
from .common import machine, ms, parser, publish, status_kib, summary

VIG = {"clusters": 1, "global_update": False}  # bench.models' baseline
MODELS = ("cvig-padded-auto", "cvig-padded-balanced", "cvig-masked", "vig")
BALANCED_MARGIN = 1.25  # cvig-padded-balanced: P = ceil(1.25 N / kappa), the auto rule for equal partitions


def parse_sizes(text: str) -> List[Tuple[int, int]]:
    sizes = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {part!r} is not HxW (e.g. 800x1344)") from None
        sizes.append((h, w))
    return sizes


# Runs a module in this interpreter and, at exit, writes the process's own peak resident memory (VmHWM: the
# high-water mark of the address space exec made, in KiB) to the file named first. The kernel's ru_maxrss of a
# child (wait4, getrusage) is not that: exec folds in the high-water mark of the address space it replaces, the
# parent's when the child was vfork()ed, so every child of a large benchmark process reported the parent's size.
_HWM_WRAPPER = ("import atexit, runpy, sys\n"
                "out = sys.argv.pop(1)\n"
                "def hwm():\n"
                "    kib = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
                "    open(out, 'w').write(kib)\n"
                "atexit.register(hwm)\n"
                "sys.argv.pop(0)\n"
                "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run_child(module_args: Sequence[str], log: Path) -> Tuple[int, float, int]:
    """Run ``python -m <module_args>`` (output to ``log``); returns (exit code, wall seconds, the child's own
    peak resident memory in bytes, 0 when it did not exit normally)."""
    hwm = log.with_suffix(".hwm")
    hwm.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _HWM_WRAPPER, str(hwm), *module_args]
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    peak = int(hwm.read_text()) * 1024 if hwm.is_file() else 0
    return rc, wall, peak


def latency_child(path: str, repeats: int) -> None:
    """In a fresh process: load ``path`` in ONNX Runtime, one warm-up run, ``repeats`` timed runs at batch 1;
    prints JSON with the times and the resident memory after loading."""
    import numpy as np

    from clustervig.preprocess import sample_photographs, spec_hw
    from clustervig.runtime import open_session

    with open_session(path) as s:
        spec = s.preprocess
        x = sample_photographs(spec)[:1].numpy()
        assert x.shape[2:] == spec_hw(spec)
        load_rss = status_kib("VmRSS") * 1024
        s.infer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = s.infer(x)
            times.append(time.perf_counter() - t0)
        finite = all(bool(np.isfinite(v).all()) for v in out.values())
    print(json.dumps({"times": times, "rss_after_load": load_rss, "finite": finite}))


def export_graphs(model: str, size: Tuple[int, int], samples: int, work: Path) -> Dict:
    """The CLI export (padded, capacity auto, FP16, plugins) and the masked and ViG graphs."""
    import onnx

    import clustervig
    from clustervig.export.onnx_export import BatchSpec, export_onnx
    from clustervig.preprocess import sample_photographs, transform_spec
    from clustervig.utils import calibrate_batchnorm

    import torch

    h, w = size
    out = work / f"cli-{h}x{w}"
    cmd = ["clustervig.export.cli", "--model", model, "--features", "--feature-pyramid",
           "--img-size", f"{h}x{w}", "--knn", "padded", "--capacity", "auto", "--fp16", "--plugins",
           "--samples", str(samples), "--no-engine", "--no-gates", "-o", str(out)]
    print(f"[backbone] {h}x{w}: {' '.join(cmd)}", flush=True)
    rc, wall, rss = run_child(cmd, work / f"export-{h}x{w}.log")
    if rc != 0:
        raise SystemExit(f"cvig export failed (exit {rc}); its output: {work / f'export-{h}x{w}.log'}\n"
                         + (work / f"export-{h}x{w}.log").read_text()[-3000:])
    report = json.loads((out / "report.json").read_text())
    print(f"[backbone] {h}x{w}: exported in {wall:.0f}s (peak RSS {rss / 2**30:.2f} GiB), "
          f"P = {report['capacity']['capacity']} of N = {report['capacity']['tokens']}", flush=True)
    paths = {"cvig-padded-auto": out / "model_fp32.onnx"}
    extra, balanced_row = {}, {}
    n, kappa = report["capacity"]["tokens"], clustervig.get_config(model).clusters
    balanced = min(n, math.ceil(BALANCED_MARGIN * n / kappa))
    for label, overrides in (("cvig-padded-balanced", {"knn": "padded", "capacity": balanced}),
                             ("cvig-masked", {"knn": "masked"}), ("vig", dict(VIG, knn="masked"))):
        torch.manual_seed(0)
        m = clustervig.create_model(model, img_size=size, features_only=True, feature_pyramid=True, **overrides)
        photos = sample_photographs(transform_spec(m.cfg))
        calibrate_batchnorm(m, [photos])
        if label == "cvig-padded-balanced":  # its overflow on the export's validation photographs
            from clustervig.export.cli import measure_partitions

            got = measure_partitions(m.eval(), photos[:samples], balanced)
            balanced_row = {"capacity": balanced, "clusters": kappa, "images": samples,
                            "overflow_tokens": got["overflow_tokens"],
                            "overflow_fraction": got["overflow_tokens"] / (samples * n * len(got["overflow_per_block"])),
                            "largest_partition": got["largest_partition"]}
        path = work / f"{label}-{h}x{w}.onnx"
        t0 = time.perf_counter()
        export_onnx(m, path, BatchSpec(1, 1, 1))
        extra[label] = {"export_api_s": time.perf_counter() - t0, "bytes": path.stat().st_size}
        paths[label] = path
        print(f"[backbone] {h}x{w}: {label} exported in {extra[label]['export_api_s']:.0f}s", flush=True)
    del m
    from clustervig.export.trt_compat import memory_summary

    trt = {name: tensorrt_needs(memory_summary(onnx.load(str(path)), top=None))
           for name, path in (("padded", paths["cvig-padded-auto"]), ("masked", paths["cvig-masked"]),
                              ("plugins", out / "model_plugins.onnx"))}
    return {"report": report, "wall_s": wall, "peak_rss": rss, "paths": {k: str(v) for k, v in paths.items()},
            "api_exports": extra, "balanced": balanced_row, "tensorrt": trt, "command": "cvig export " + " ".join(cmd[1:-2]) + " -o OUT"}


def tensorrt_needs(summary: Dict) -> Dict:
    """The rows of a memory summary the table names: the largest tensor, the largest of the k-NN scope (the
    similarity) and of its partition layout, the TopK sizes and the k-means working sets."""
    rows = summary["largest"]
    knn = [r for r in rows if "/knn/" in r["example"]]
    return {"batch": summary["batch"], "largest": rows[:1], "knn_largest": knn[:1],
            "topk": summary["topk"], "kmeans_smem": summary["kmeans_smem"], "max_elements": summary["max_elements"],
            "max_elements_limit": summary["max_elements_limit"]}


def fidelity(report: Dict) -> Dict:
    """Per input set: FP32 vs PyTorch and FP16 (emulated) vs FP32, worst map and each map; decisions agreement."""
    out = {}
    for set_name, comps in report["validation"]["results"].items():
        row = {}
        for key in ("fp32 vs pytorch", "fp16-emulated vs fp32", "plugins vs fp32"):
            r = comps.get(key)
            if r is None:
                continue
            row[key] = {"cosine_min": r["cosine_min"], "max_abs_diff": r["max_abs_diff"],
                        "label_agreement": r.get("label_agreement"), "neighbor_agreement": r.get("neighbor_agreement"),
                        "label_agreement_per_block": r.get("label_agreement_per_block"),
                        "outputs": {n: {k: o[k] for k in ("cosine_min", "max_abs_diff", "max_abs_reference")}
                                    for n, o in r["outputs"].items()}}
        out[set_name] = row
    return out


def run(model: str, sizes: Sequence[Tuple[int, int]], repeats: int, samples: int) -> Dict:
    t_all = time.perf_counter()
    res: Dict = {"machine": machine(), "model": model, "repeats": repeats, "samples": samples,
                 "load_before": os.getloadavg()[0], "sizes": []}
    with tempfile.TemporaryDirectory(prefix="cvig-backbone-") as d:
        work = Path(d)
        for size in sizes:
            h, w = size
            ex = export_graphs(model, size, samples, work)
            report = ex["report"]
            lat: Dict[str, Dict] = {m: {"times": [], "peak_rss": 0, "rss_after_load": 0} for m in MODELS}
            per_round = max(1, math.ceil(repeats / 2))
            done = 0
            while done < repeats:  # two rounds (A B C, A B C): machine noise hits all graphs alike
                n = min(per_round, repeats - done)
                for m in MODELS:
                    log = work / f"lat-{m}-{h}x{w}.log"
                    rc, _, rss = run_child(["bench.backbone", "--latency-child",
                                            ex["paths"][m], "--repeats", str(n)], log)
                    if rc != 0:
                        raise SystemExit(f"latency run of {m} at {h}x{w} failed: {log.read_text()[-2000:]}")
                    rec = json.loads(log.read_text().strip().splitlines()[-1])
                    lat[m]["times"] += rec["times"]
                    lat[m]["peak_rss"] = max(lat[m]["peak_rss"], rss)
                    lat[m]["rss_after_load"] = max(lat[m]["rss_after_load"], rec["rss_after_load"])
                    lat[m]["finite"] = rec["finite"]
                    print(f"[backbone] {h}x{w} {m:<17} {', '.join(f'{t:.2f}' for t in rec['times'])} s  "
                          f"peak RSS {rss / 2**30:.2f} GiB", flush=True)
                done += n
            cap = report["capacity"]
            res["sizes"].append({
                "img_size": [h, w], "tokens": cap["tokens"], "grid": report["model"]["grid"],
                "export": {"command": ex["command"], "wall_s": ex["wall_s"], "peak_rss": ex["peak_rss"],
                           "stages_s": report["timings_s"],
                           "nodes": {k: v.get("nodes") for k, v in report["artifacts"].items()},
                           "bytes": {k: v.get("bytes") for k, v in report["artifacts"].items()},
                           "api_exports": ex["api_exports"]},
                "balanced": ex["balanced"],
                "capacity": {k: cap[k] for k in ("capacity", "tokens", "largest_partition", "margin")}
                | {"sets": {s: {k: v[k] for k in ("images", "overflow_at_capacity", "overflow_fraction",
                                                   "overflow_below_largest_partition") if k in v}
                            for s, v in cap["sets"].items()}},
                "outputs": report["outputs"],
                "fidelity": fidelity(report),
                "gates_failed": report["gates"]["failed"],
                "latency": {m: {**summary(v["times"]), "peak_rss": v["peak_rss"], "rss_after_load": v["rss_after_load"],
                                "finite": v.get("finite")} for m, v in lat.items()},
                "tensorrt": ex["tensorrt"],
            })
    res["wall_s"] = time.perf_counter() - t_all
    return res


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f}"


def markdown(res: Dict) -> str:
    m = res["machine"]
    lines = [
        f"## ClusterViG as a detection backbone: {res['model']} at high resolution (CPU)",
        "",
        f"`python -m bench.backbone` — {m['cpu_count']} CPU cores shared with other work (load average "
        f"{res['load_before']:.1f} at the start: the times are inflated by it), torch {m['torch']}, onnxruntime "
        f"{m.get('onnxruntime', '-')}, {m['date']}. Random weights (BatchNorm set on photographs), the simple "
        "feature pyramid after the last block (outputs p3–p6, strides 8–64). `cvig-padded-auto` is what "
        "`cvig export --knn padded --capacity auto` writes (capacity P = 1.25 × the largest partition seen on "
        "the validation images); `cvig-padded-balanced` the padded layout at the capacity equal partitions would "
        "get (P = ⌈1.25 N/κ⌉; tokens of larger partitions overflow, their share of (token, block) slots on the "
        "validation photograph(s) given); `cvig-masked` the N×N masked layout; `vig` the same network with κ = 1 and no "
        "global update (ViG's full-image k-NN; the baseline of the *Whole model* sections). ONNX Runtime, batch 1, "
        f"median (min–max) over {res['repeats']} runs, each graph in its own process: its resident memory once the "
        "session is loaded (Python, torch and ONNX Runtime included) and at its peak.",
        "",
        "| input | N (grid) | graph | latency ms | ViG / this | RSS after loading GiB | peak RSS GiB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for s in res["sizes"]:
        lat = s["latency"]
        vig = lat["vig"]["median_s"]
        grid = "×".join(str(v) for v in (s["grid"] if isinstance(s["grid"], list) else [s["grid"]] * 2))
        for name in MODELS:
            r = lat[name]
            label = {"cvig-padded-auto": f"{name} (P = {s['capacity']['capacity']})",
                     "cvig-padded-balanced": f"{name} (P = {s['balanced']['capacity']}, "
                                             f"{s['balanced']['overflow_fraction'] * 100:.1f} % overflow)"}.get(name, name)
            lines.append(f"| {s['img_size'][0]}×{s['img_size'][1]} | {s['tokens']} ({grid}) | {label} | {ms(r)} | "
                         f"{vig / r['median_s']:.2f}× | {_gib(r['rss_after_load'])} | {_gib(r['peak_rss'])} |")
    for s in res["sizes"]:
        n, m = s["tokens"], s["capacity"]["largest_partition"]
        lines.append("")
        kappa = s["balanced"]["clusters"]
        lines.append(f"At {s['img_size'][0]}×{s['img_size'][1]} the largest k-means partition holds {m} of {n} tokens "
                     f"({m / n * 100:.0f} %; equal partitions would hold N/κ = {n / kappa:.0f}): per block and image "
                     f"the masked layout and ViG compute N² = {n * n / 1e6:.2f} M similarities, the padded layout κP² = "
                     f"{kappa * s['capacity']['capacity'] ** 2 / 1e6:.2f} M at the auto P = {s['capacity']['capacity']} "
                     f"and {kappa * s['balanced']['capacity'] ** 2 / 1e6:.2f} M at the balanced P = "
                     f"{s['balanced']['capacity']}.")
    lines += ["", f"Export (`cvig export --model {res['model']} --features --feature-pyramid --img-size HxW --knn padded "
                  f"--capacity auto --fp16 --plugins --samples {res['samples']} --no-gates`, a fresh process, validation on "
                  f"{res['samples']} photograph(s) and {res['samples']} random image(s)), and the capacity it chose:",
              "", "| input | export s | stages s | peak RSS GiB | FP32 ONNX MiB (nodes) | P / N | largest partition M | "
                  "overflow at P (photos, random) | overflow at M − 1 |",
              "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for s in res["sizes"]:
        e, c = s["export"], s["capacity"]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in e["stages_s"].items() if v >= 0.5)
        over = ", ".join(f"{v['overflow_at_capacity']}" for v in c["sets"].values())
        below = ", ".join(str(v.get("overflow_below_largest_partition", "–")) for v in c["sets"].values())
        lines.append(f"| {s['img_size'][0]}×{s['img_size'][1]} | {e['wall_s']:.0f} | {stages} | {_gib(e['peak_rss'])} | "
                     f"{_mib(e['bytes']['fp32'])} ({e['nodes']['fp32']}) | {c['capacity']} / {c['tokens']} | "
                     f"{c['largest_partition']} | {over} | {below} |")
    lines += ["", "Fidelity of every output map: the FP32 ONNX graph against PyTorch and the FP16 graph (per-op FP16 "
                  "rounding emulated, FP32 islands `norm,kmeans,knn`) against FP32, worst image per map (cosine of the "
                  "flattened map; max |Δ| next to the map's max |value|), and the k-means label / k-NN neighbour "
                  "agreement over all blocks. Random weights: FP16 rounding moves k-means decisions more than it "
                  "would on trained features (README, FP16).", "",
              "| input | images | comparison | p3 cos (max \\|Δ\\| / max) | p4 | p5 | p6 | labels | neighbours |",
              "|---|---|---|---|---|---|---|---:|---:|"]
    for s in res["sizes"]:
        for set_name, row in s["fidelity"].items():
            for key in ("fp32 vs pytorch", "fp16-emulated vs fp32"):
                r = row.get(key)
                if r is None:
                    continue
                cells = [f"{o['cosine_min']:.5f} ({o['max_abs_diff']:.2g} / {o['max_abs_reference']:.3g})"
                         for o in r["outputs"].values()]
                lab = f"{r['label_agreement'] * 100:.2f}%" if r["label_agreement"] is not None else "–"
                nb = f"{r['neighbor_agreement'] * 100:.2f}%" if r["neighbor_agreement"] is not None else "–"
                lines.append(f"| {s['img_size'][0]}×{s['img_size'][1]} | {set_name} | {key} | {' | '.join(cells)} | "
                             f"{lab} | {nb} |")
    per_block = [f"{s['img_size'][0]}×{s['img_size'][1]} {set_name}: "
                 + " ".join(f"{v * 100:.0f}" for v in row["fp32 vs pytorch"]["label_agreement_per_block"])
                 for s in res["sizes"] for set_name, row in s["fidelity"].items()
                 if (row.get("fp32 vs pytorch") or {}).get("label_agreement_per_block")]
    if per_block:
        lines += ["", "k-means label agreement of the FP32 graph with PyTorch per block, in % (first block first): "
                      "where a decision sits within float rounding of a tie it flips, and every later block sees "
                      "the change.", ""] + [f"- {line}" for line in per_block]
    lines += ["", "What a TensorRT engine of these graphs holds (static shapes at batch 1, `trt_compat.memory_summary`; "
                  "docs/tensorrt.md section 9): the largest k-NN tensor per block, the TopK sizes (K ≤ 3840 holds: K is "
                  "at most 18) and, in the plugin graph, the k-means working set.", "",
              "| input | graph | largest k-NN tensor | TopK axis × K | largest tensor overall | k-means shared memory |",
              "|---|---|---|---|---|---|"]
    for s in res["sizes"]:
        for graph in ("masked", "padded", "plugins"):
            t = s["tensorrt"][graph]
            knn = t["knn_largest"]
            k_row = f"{knn[0]['op']} {knn[0]['shape']} {_mib(knn[0]['bytes'])} MiB × {knn[0]['count']}" if knn else "–"
            topk = ", ".join(f"{r['axis_length']}×{r['k']}" for r in t["topk"]) or "none (plugin)"
            big = t["largest"][0]
            smem = ", ".join(f"{r['bytes']} B (N {r['n']}, C {r['c']}, κ {r['clusters']})" for r in t["kmeans_smem"]) or "–"
            lines.append(f"| {s['img_size'][0]}×{s['img_size'][1]} | {graph} | {k_row} | {topk} | {big['op']} "
                         f"{big['shape']} {_mib(big['bytes'])} MiB | {smem} |")
    failed = [f"{s['img_size'][0]}x{s['img_size'][1]}: {g}" for s in res["sizes"] for g in s["gates_failed"]]
    lines += ["", "Gates of the exports: " + ("all passed." if not failed else "; ".join(failed) + ". With random "
              "weights the FP32 and plugin gates (cosine ≥ 0.9999) read k-means decisions that sit within float "
              "rounding of a tie and flip between PyTorch and ONNX Runtime (the per-block agreement above); where "
              "all decisions agree the graphs are equal (tests/test_export_backbone.py)."),
              f"Whole run {res['wall_s'] / 60:.0f} min."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.backbone", __doc__)
    ap.add_argument("--model", default="cvig_s")
    ap.add_argument("--sizes", default="800x1344,512x512", help="input sizes HxW, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per graph (in two rounds)")
    ap.add_argument("--samples", type=int, default=1, help="cvig export --samples (validation images per set)")
    ap.add_argument("--results", type=Path, default=None,
                    help="write the JSON here instead of bench/results/ (with --markdown: a smoke run)")
    ap.add_argument("--markdown", type=Path, default=None, help="update this file instead of BENCHMARKS.md")
    ap.add_argument("--latency-child", default=None, help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.latency_child:
        latency_child(args.latency_child, args.repeats)
        return 0
    sizes = parse_sizes(args.sizes)
    if args.results is not None or args.markdown is not None:
        common.configure(*common.quick_paths(args.results, args.markdown))
    try:
        res = run(args.model, sizes, args.repeats, args.samples)
        publish("backbone_cpu", "backbone", res, markdown)
    finally:
        common.configure(None, None)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
