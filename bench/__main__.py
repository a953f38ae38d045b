"""The benchmark suite: the paper's efficiency claims, measured side by side, in one command.

    python -m bench                 # full suite (about 15 minutes on a 2-core CPU), regenerates BENCHMARKS.md
    python -m bench --quick         # a 1-2 minute smoke run on cvig_nano (same code paths, tiny sizes), written
                                    # to bench/results/tmp-quick/ (git-ignored), never over the published results
    python -m bench --only graph,models --results /tmp/r --markdown /tmp/B.md

Steps (each also runs alone as ``python -m bench.<step>``):

  graph   one DEGC's graph construction vs ViG's full k-NN at N = 196/784/3136, kappa = 1/4/6,
          PyTorch and ONNX Runtime CPU: time (median, min-max) and peak memory (fresh process each)
  models  whole cvig_ti / cvig_s vs their ViG baseline: throughput vs batch (Table VI layout) for
          PyTorch reference/static, ORT FP32/FP16/INT8 and the plugin graph; then batch-1 latency vs
          tokens (N = 196/784/3136) with the masked and padded k-NN layouts
  gpu     PyTorch CUDA eager FP32/FP16 and CUDA graphs (records why it did not run without a GPU)
  plots   PNGs in bench/results/: speed vs batch, graph time vs N, memory vs N, latency vs N
  claims  the paper's claims, each with the measured ratios and a computed verdict

JSON results (with machine, versions and date) go to bench/results/, tables to BENCHMARKS.md; a --quick
run's go to bench/results/tmp-quick/ and its BENCHMARKS.md (or --results DIR, --markdown FILE).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import claims, common, gpu, graph_construction, models, plots

STEPS = ("graph", "models", "gpu", "plots", "claims")

FULL = {
    "graph": dict(tokens=[196, 784, 3136], clusters=[1, 4, 6], repeats=5),
    "models": dict(sizes=["ti", "s"], batches=[1, 8, 32], grids=[14, 28, 56], repeats=3, token_repeats=3,
                   token_size="ti"),
    "gpu": dict(sizes=["ti", "s"], batches=[1, 8, 32, 64, 128, 256], repeats=20),
}
QUICK = {
    "graph": dict(tokens=[196, 784], clusters=[1, 4], repeats=2),
    "models": dict(sizes=["nano"], batches=[1, 2], grids=[14, 28], repeats=2, token_repeats=2, token_size="nano"),
    "gpu": dict(sizes=["nano"], batches=[1, 8], repeats=5),
}


def run_suite(only=STEPS, quick: bool = False) -> dict:
    cfg = QUICK if quick else FULL
    walls = {}
    t_all = time.perf_counter()

    def step(name, fn):
        t0 = time.perf_counter()
        print(f"== bench: {name} ==", flush=True)
        fn()
        walls[name] = round(time.perf_counter() - t0, 1)
        print(f"== bench: {name} done in {walls[name]:.0f}s ==", flush=True)

    if "graph" in only:
        def _graph():
            c = cfg["graph"]
            res = graph_construction.run(c["tokens"], c["clusters"], c["repeats"], ort=True, memory=True)
            common.publish("graph_construction_cpu", "graph", res, graph_construction.markdown)
        step("graph", _graph)
    if "models" in only:
        def _models():
            c = cfg["models"]
            res = models.run(c["sizes"], c["batches"], c["grids"], list(models.BACKENDS), c["repeats"],
                             c["token_repeats"], c["token_size"])
            models.publish_results(res)
        step("models", _models)
    if "gpu" in only:
        def _gpu():
            c = cfg["gpu"]
            common.publish("gpu", "gpu", gpu.run(c["sizes"], c["batches"], c["repeats"]), gpu.markdown)
        step("gpu", _gpu)
    if "plots" in only:
        def _plots():
            paths = plots.draw_all(common.read_json("models_cpu"), common.read_json("graph_construction_cpu"))
            common.update_section("plots", plots.markdown(paths))
        step("plots", _plots)
    if "claims" in only:
        step("claims", lambda: common.update_section(
            "claims", claims.markdown(common.read_json("models_cpu"), common.read_json("graph_construction_cpu"))))
    summary = {"machine": common.machine(), "quick": quick, "steps_s": walls,
               "total_s": round(time.perf_counter() - t_all, 1)}
    common.write_json("suite", summary)
    return summary


def main(argv=None) -> int:
    ap = common.parser("python -m bench", __doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (cvig_nano, N <= 784): a smoke run, written to "
                    "bench/results/tmp-quick/ (never over the published results)")
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps from {', '.join(STEPS)}")
    ap.add_argument("--results", type=Path, default=None,
                    help="results folder (default: bench/results; with --quick bench/results/tmp-quick)")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="markdown file (default: BENCHMARKS.md; with --quick BENCHMARKS.md in the results folder)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    bad = sorted(set(only) - set(STEPS))
    if bad:
        ap.error(f"unknown step(s) {bad}; choose from {', '.join(STEPS)}")
    if "plots" in only:
        plots.require_matplotlib()  # fail before the measurements, not after them
    results, markdown = args.results, args.markdown
    if args.quick:
        try:
            results, markdown = common.quick_paths(results, markdown)
        except ValueError as exc:
            ap.error(str(exc))
        print(f"quick run (smoke numbers): results in {results}, tables in {markdown}; the published "
              f"{common.ROOT / 'BENCHMARKS.md'} and bench/results/ are not touched", flush=True)
    common.configure(results, markdown)
    summary = run_suite(only, args.quick)
    print(json.dumps(summary["steps_s"]), f"total {summary['total_s']:.0f}s")
    print(f"results in {common.RESULTS}, tables in {common.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
