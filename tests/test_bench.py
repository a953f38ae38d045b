"""The benchmark suite (python -m bench) on tiny sizes: numbers, ratios, memory, plots and generated claims."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import bench.common as common
from bench import __main__ as suite
from bench import claims, graph_construction, models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    common.configure(d, d / "BENCHMARKS.md")
    saved = dict(suite.QUICK)
    suite.QUICK = {**saved, "graph": dict(tokens=[196, 784], clusters=[1, 4], repeats=1),
                   "models": dict(sizes=["nano"], batches=[1, 2], grids=[14], repeats=1, token_repeats=1,
                                  token_size="nano")}
    try:
        summary = suite.run_suite(quick=True)
    finally:
        suite.QUICK = saved
        common.configure(None, None)
    return d, summary


def test_suite_writes_every_result_plot_and_section(quick):
    d, summary = quick
    assert set(summary["steps_s"]) == set(suite.STEPS)
    for name in ("graph_construction_cpu", "models_cpu", "gpu", "suite"):
        data = json.loads((d / f"{name}.json").read_text())
        assert data["machine"]["torch"] and data["machine"]["date"]
    for png in ("speed_vs_batch", "graph_time_vs_n", "memory_vs_n", "tokens_vs_n"):
        with Image.open(d / f"{png}.png") as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    md = (d / "BENCHMARKS.md").read_text()
    for key in ("graph", "models", "tokens", "gpu", "plots", "claims"):
        assert f"<!-- bench:{key} -->" in md and f"<!-- /bench:{key} -->" in md
    assert "![speed_vs_batch](speed_vs_batch.png)" in md
    # no GPU here: the section says why instead of showing numbers
    gpu = json.loads((d / "gpu.json").read_text())
    import torch
    assert ("skipped" in gpu) == (not torch.cuda.is_available())


def test_graph_rows_sizes_and_measured_memory(quick):
    d, _ = quick
    res = json.loads((d / "graph_construction_cpu.json").read_text())
    rows = res["rows"]
    assert {(r["tokens"], r["backend"], r["method"]) for r in rows} == {
        (n, bk, m) for n in (196, 784) for bk in ("torch", "ort") for m in ("vig-full", "degc-masked-k4", "degc-padded-k4")}
    b = res["batch"]
    for r in rows:
        side = math.ceil(1.25 * r["tokens"] / r["clusters"]) if r["mode"] == "padded" else r["tokens"]
        parts = r["clusters"] if r["mode"] == "padded" else 1
        assert r["similarity_mib"] == pytest.approx(b * parts * side * side * 4 / 2**20)
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
    # the full k-NN must materialise its B x N x N similarity: the measured peak growth cannot be below it
    for bk in ("torch", "ort"):
        full = next(r for r in rows if r["tokens"] == 784 and r["backend"] == bk and r["method"] == "vig-full")
        assert full["peak_rss_growth_mib"] >= 0.9 * full["similarity_mib"], full


def test_model_rows_and_ratios_match_the_raw_medians(quick):
    d, _ = quick
    res = json.loads((d / "models_cpu.json").read_text())
    rows = res["throughput"]
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == {
        (m, bk, b) for m in ("cvig_nano", "vig_nano") for bk in models.BACKENDS for b in (1, 2)}
    for r in rows:
        assert r["throughput_img_s"] == pytest.approx(r["batch"] / r["median_s"])
    med = {(r["model"], r["backend"], r["batch"]): r["median_s"] for r in rows}
    ratios = models.ratio_table(rows, "median_s")
    for (size, bk, b), v in ratios.items():
        assert v == pytest.approx(med[("vig_nano", bk, b)] / med[("cvig_nano", bk, b)])
        assert f"{v:.2f}×" in models.markdown_models(res)
    toks = res["tokens"]
    assert {r["model"] for r in toks} == {"cvig_nano-masked", "cvig_nano-padded", "vig_nano"}
    assert next(r for r in toks if r["model"] == "cvig_nano-padded")["capacity"] == math.ceil(1.25 * 196 / 4)


def test_claims_verdicts_follow_the_numbers(quick):
    d, _ = quick
    graph = json.loads((d / "graph_construction_cpu.json").read_text())
    text = "\n".join(claims.graph_claim(graph))
    rows = [r for r in graph["rows"] if "method" in r]
    for r in rows:
        if r["mode"] != "padded":
            continue
        v = next(x for x in rows if x["tokens"] == r["tokens"] and x["backend"] == r["backend"] and x["method"] == "vig-full")
        s = v["median_s"] / r["median_s"]
        assert f"κ={r['clusters']}: {s:.2f}× ({claims.verdict(s)})" in text
    assert claims.verdict(1.10) == "faster" and claims.verdict(0.95) == "slower" and claims.verdict(1.0) == "on par"


def test_cli_help_and_bad_step():
    r = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "graph" in r.stdout and "--quick" in r.stdout
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "graphs"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown step(s) ['graphs']" in r.stderr
    r = subprocess.run([sys.executable, "-m", "bench.models", "--backends", "ort-fp64"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 2 and "unknown backend(s) ['ort-fp64']" in r.stderr


def test_memory_child_reports_the_calls_own_peak():
    # a fresh process whose parent is large must not inherit the parent's high-water mark
    out = graph_construction._child_peak(196, 1, "masked", 0, "")
    assert out["rss_peak_kib"] >= out["rss_before_kib"] > 0


def test_plugins_cpu_rows_and_table(tmp_path):
    from bench import plugins_cpu

    common.configure(tmp_path, tmp_path / "BENCHMARKS.md")
    try:
        assert plugins_cpu.main(["--models", "cvig_nano", "--batches", "1", "--repeats", "1"]) == 0
    finally:
        common.configure(None, None)
    res = json.loads((tmp_path / "plugins_cpu.json").read_text())
    assert {(r["backend"], r["batch"]) for r in res["models"]} == {(b, 1) for b in plugins_cpu.MODEL_BACKENDS}
    assert {(r["op"], r["impl"]) for r in res["degc"]} == {
        ("kmeans", "kernel"), ("kmeans", "torch"), ("knn", "kernel"), ("knn", "torch-masked"),
        ("gather_max_rel", "kernel"), ("gather_max_rel", "torch")}
    md = (tmp_path / "BENCHMARKS.md").read_text()
    med = {r["backend"]: r["median_s"] for r in res["models"]}
    assert f"{med['ort-fp32'] / med['ort-plugins']:.2f}x" in md  # speed-up = pure time / plugin time
    assert "| cvig_nano (196, 32, 4, 9) | 1 | kmeans |" in md
    with pytest.raises(SystemExit, match="unknown model"):
        plugins_cpu.main(["--models", "cvig_huge"])
