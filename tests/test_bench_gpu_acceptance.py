"""python -m bench.gpu_acceptance on a CPU machine: the no-GPU exit, --help, and its report from synthetic results."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_acceptance as acc

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
SLUG = "NVIDIA_H100_80GB_HBM3"


def _cli(*args, env_extra=None):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env_extra or {})}  # no GPU, even on a GPU machine
    return subprocess.run([sys.executable, "-m", "bench.gpu_acceptance", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _snapshot():
    md = ROOT / "BENCHMARKS.md"
    return {
        "results": sorted(p.name for p in (ROOT / "bench" / "results").glob("*gpu_acceptance*")),
        "md_marker": "bench:gpu-acceptance" in (md.read_text() if md.is_file() else ""),
        "build": (ROOT / "build" / "gpu-acceptance").exists(),
        "quick": acc.QUICK_OUT.exists(),
    }


def test_without_gpu_exits_2_with_one_line_and_writes_nothing(tmp_path):
    before = _snapshot()
    for args in ([], ["--out", str(tmp_path / "out")], ["--quick"], ["--skip-build", "--skip-tests"]):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stdout == ""
        lines = [line for line in r.stderr.splitlines() if line.startswith("no CUDA GPU: ")]
        assert len(lines) == 1 and "torch.cuda.is_available() is False" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    assert _snapshot() == before


def test_help_lists_the_options():
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--quick", "--skip-build", "--skip-tests", "--out"):
        assert opt in r.stdout
    assert "pip install --no-deps --no-build-isolation -e ." in r.stdout
    assert "no CUDA GPU" not in r.stdout + r.stderr


# ----------------------------------------------------------------------------
# Rendering, from a synthetic results dict
# ----------------------------------------------------------------------------


def _case(name, dtype, b, n, c, k, times):
    return {"name": name, "dtype": dtype, "shape": {"batch": b, "tokens": n, "dim": c, "clusters": k, "k": 9},
            "times_us": {op: ({"gpu_us": v, "eager_us": v * 3} if v is not None else
                              {"gpu_us": None, "eager_us": 900.0, "error": "CUDA-graph capture failed"})
                         for op, v in times.items()}}


def _times(km, knn, convs, km_torch=400.0):
    return {"kmeans_kernel": km, "kmeans_torch": km_torch, "knn_kernel": knn, "knn_torch_masked_topk": 80.0,
            "segment_mean_kernel": 5.0, "segment_mean_torch": 9.0, "gather_max_rel_kernel": 12.0,
            "gather_max_rel_torch": 30.0, "grapher_fc1_fc2_convs": convs}


def _row(model, b, path, mode, img_s=None, **extra):
    r = {"model": model, "batch": b, "path": path, "mode": mode, **extra}
    if img_s is not None:
        med = b / img_s
        r.update(median_s=med, min_s=med * 0.98, max_s=med * 1.05, throughput_img_s=img_s)
    return r


CAPTURE_ERR = "CUDA-graph capture failed: RuntimeError: Cannot copy between CPU and CUDA tensors during capture"


def synthetic():
    cases = [
        _case("cvig_ti DEGC", "fp16", 64, 196, 192, 4, _times(31.0, 24.5, 61.0)),
        _case("cvig_ti DEGC", "fp32", 64, 196, 192, 4, _times(44.0, 39.0, 70.0, km_torch=None)),
        _case("cvig_b_hr DEGC", "fp16", 1, 784, 640, 6, _times(38.2, 20.0, 15.0)),
        _case("cvig_b_hr DEGC", "fp32", 1, 784, 640, 6, _times(47.9, 26.0, 19.0)),
    ]
    rows = []
    for mode, st, ke in (("eager-fp32", 1200.0, 1800.0), ("eager-fp16", 2500.0, 3750.0)):
        rows += [_row("cvig_ti", 512, "static", mode, st), _row("cvig_ti", 512, "kernels", mode, ke)]
    rows += [_row("cvig_ti", 512, "static", "cudagraph-fp16", error=CAPTURE_ERR),
             _row("cvig_ti", 512, "kernels", "cudagraph-fp16", 5120.0),
             _row("cvig_ti", 1, "static", "eager-fp32", 95.26), _row("cvig_ti", 1, "kernels", "eager-fp32", 190.5),
             _row("cvig_s", 256, "static", "eager-fp32", oom=True), _row("cvig_s", 256, "kernels", "eager-fp32", 900.0),
             _row("cvig_s", 256, "static", "cudagraph-fp16", error=CAPTURE_ERR)]
    return {
        "command": "python -m bench.gpu_acceptance",
        "date": "2026-12-01T10:00:00+00:00",
        "device": {"name": GPU, "capability": "9.0", "sms": 132, "memory_gib": 79.1},
        "versions": {"torch": "2.13.0+cu130", "cuda": "13.0"},
        "steps": {
            "build": {"status": "ok", "seconds": 70.0, "arch": "90", "nvcc_version": "release 13.0, V13.0.88"},
            "tests": {"status": "ok", "seconds": 95.0, "counts": {"passed": 97, "xfailed": 1, "skipped": 1}},
            "kernels": {"status": "ok", "seconds": 40.0, "json": f"/x/kernels_{SLUG}.json",
                        "data": {"inner": 20, "repeats": 30, "cases": cases}},
            "models": {"status": "ok", "seconds": 150.0, "repeats": 10, "warmup": 3, "inputs": "photos", "rows": rows,
                       "settings": {"cudnn_benchmark": True, "cudnn_allow_tf32": True, "matmul_allow_tf32": False}},
        },
    }


def _goals(res):
    return {g["key"]: g for g in acc.evaluate_goals(res)}


def test_goals_met():
    g = _goals(synthetic())
    assert g["kmeans_b_hr_b1"]["met"] is True  # FP16 38.2, FP32 47.9 <= 50
    assert g["kmeans_b_hr_b1"]["values"] == {"fp16": 38.2, "fp32": 47.9}
    assert g["kmeans_b_hr_b1"]["measured"] == "FP16 38.2 µs, FP32 47.9 µs"
    assert g["ti_degc_b64_fp16"]["met"] is True  # 31.0 + 24.5 = 55.5 < 61.0
    assert g["ti_degc_b64_fp16"]["values"]["kernels_us"] == pytest.approx(55.5)
    assert g["ti_degc_b64_fp16"]["values"]["convs_us"] == 61.0
    assert g["ti_b512_throughput"]["met"] is True  # 5,120 >= 4,939
    assert g["ti_b512_throughput"]["values"] == {"best_img_s": 5120.0, "best_cell": "kernels cudagraph-fp16"}
    assert g["ti_b512_throughput"]["measured"] == "5,120 img/s (kernels, cudagraph-fp16)"


def test_goals_not_met_and_not_measured():
    res = synthetic()
    cases = res["steps"]["kernels"]["data"]["cases"]
    cases[3]["times_us"]["kmeans_kernel"]["gpu_us"] = 52.5  # FP32 above 50 us, FP16 still below
    cases[0]["times_us"]["knn_kernel"]["gpu_us"] = 40.0  # 31 + 40 = 71 > 61
    for r in res["steps"]["models"]["rows"]:
        if r["model"] == "cvig_ti" and r["batch"] == 512 and r.get("throughput_img_s"):
            r["throughput_img_s"] = r["throughput_img_s"] * 0.9  # best 4,608 < 4,939
    g = _goals(res)
    assert g["kmeans_b_hr_b1"]["met"] is False and "FP32 52.5 µs" in g["kmeans_b_hr_b1"]["measured"]
    assert g["ti_degc_b64_fp16"]["met"] is False and g["ti_degc_b64_fp16"]["values"]["kernels_us"] == 71.0
    assert g["ti_b512_throughput"]["met"] is False
    assert g["ti_b512_throughput"]["values"]["best_img_s"] == pytest.approx(4608.0)
    # the exact boundary of the throughput goal counts as met
    for r in res["steps"]["models"]["rows"]:
        if r.get("path") == "kernels" and r.get("mode") == "cudagraph-fp16" and r["batch"] == 512:
            r["throughput_img_s"] = 4939.0
    assert _goals(res)["ti_b512_throughput"]["met"] is True
    # a step that failed or did not run: not measured, never met
    res = synthetic()
    res["steps"]["kernels"] = {"status": "failed", "error": "bench_kernels.py exited with 1"}
    res["steps"]["models"]["rows"] = [r for r in res["steps"]["models"]["rows"] if r["batch"] != 512]
    g = _goals(res)
    assert [g[k]["met"] for k in ("kmeans_b_hr_b1", "ti_degc_b64_fp16", "ti_b512_throughput")] == [None] * 3
    assert g["ti_b512_throughput"]["measured"] == "not measured"
    # one precision of the b_hr case without a GPU time: not fully measured
    res = synthetic()
    res["steps"]["kernels"]["data"]["cases"][2]["times_us"]["kmeans_kernel"]["gpu_us"] = None
    assert _goals(res)["kmeans_b_hr_b1"]["met"] is None


def _table(md: str, header_start: str):
    """Rows (lists of cells) of the markdown table whose header starts with header_start."""
    lines = md.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    out = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_markdown_tables_and_verdicts():
    md = acc.render_markdown(synthetic())
    assert md.splitlines()[0] == f"## GPU acceptance: {GPU}"
    assert "compute capability 9.0, 132 SMs" in md and "quick run" not in md
    goals = _table(md, "| goal |")
    assert [r[3] for r in goals] == ["**met**"] * 3
    assert goals[0][1] == "<= 50 µs" and goals[2][1] == ">= 4,939 img/s"
    assert goals[1][2] == "55.5 µs (k-means 31.0 µs + k-NN 24.5 µs)" and goals[1][1] == "< 61.0 µs (the convs)"
    steps = {r[0]: r for r in _table(md, "| step |")}
    assert steps["build"][1:] == ["ok", "70", "sm_90, release 13.0, V13.0.88"]
    assert steps["tests"][1:3] == ["ok", "95"] and steps["tests"][3] == "97 passed, 1 xfailed, 1 skipped"
    assert steps["kernels"][3] == f"`kernels_{SLUG}.json`"
    assert "cuDNN benchmark on, TF32 convolutions on, TF32 matmuls off." in md
    assert f"Raw results: `gpu_acceptance_{SLUG}.json`" in md
    kern = _table(md, "| case |")
    assert len(kern) == 4
    assert kern[2][:7] == ["cvig_b_hr DEGC", "1", "784", "640", "6", "9", "FP16"]
    assert kern[2][7] == "38.2" and kern[2][-1] == "15.0"
    assert kern[1][8] == "900.0 (eager)"  # k-means PyTorch of the FP32 ti case: no graph, eager time shown
    models = {(r[0], r[1], r[2]): r[3:] for r in _table(md, "| model | batch |")}
    assert models[("cvig_ti", "512", "eager-fp32")] == ["1,200", "1,800", "1.50x"]
    assert models[("cvig_ti", "512", "eager-fp16")] == ["2,500", "3,750", "1.50x"]
    assert models[("cvig_ti", "512", "cudagraph-fp16")] == ["error [1]", "5,120", "—"]
    assert models[("cvig_ti", "1", "eager-fp32")] == ["95.3", "190.5", "2.00x"]
    assert models[("cvig_s", "256", "eager-fp32")] == ["OOM", "900.0", "—"]
    assert models[("cvig_s", "256", "cudagraph-fp16")] == ["error [1]", "—", "—"]  # same message, one note
    assert ("cvig_ti", "1", "cudagraph-fp16") not in models  # neither path ran it: no row
    assert f"[1] {CAPTURE_ERR}" in md and "[2]" not in md
    # a failing result flips the verdict cell
    res = synthetic()
    res["steps"]["kernels"]["data"]["cases"][0]["times_us"]["knn_kernel"]["gpu_us"] = 40.0
    res["quick"] = True
    md2 = acc.render_markdown(res)
    assert [r[3] for r in _table(md2, "| goal |")] == ["**met**", "**not met**", "**met**"]
    assert "quick run" in md2


def test_json_rendering_and_report_files(tmp_path):
    res = synthetic()
    data = json.loads(acc.render_json(res))
    assert data["device"]["name"] == GPU and data["steps"]["tests"]["counts"]["passed"] == 97
    assert {g["key"]: g["met"] for g in data["goals"]} == {
        "kmeans_b_hr_b1": True, "ti_degc_b64_fp16": True, "ti_b512_throughput": True}
    assert "goals" not in res  # rendering does not modify the results
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- bench:gpu -->\nother section\n<!-- /bench:gpu -->\n")
    saved = acc.common.RESULTS, acc.common.BENCHMARKS_MD
    out = acc.write_report(copy.deepcopy(res), tmp_path / "out", md)
    assert (acc.common.RESULTS, acc.common.BENCHMARKS_MD) == saved  # configuration restored
    written = json.loads((tmp_path / "out" / f"gpu_acceptance_{SLUG}.json").read_text())
    assert out["json"].endswith(f"gpu_acceptance_{SLUG}.json") and written["goals"] == data["goals"]
    # a second report replaces its own section and keeps the others
    res["steps"]["kernels"]["data"]["cases"][0]["times_us"]["knn_kernel"]["gpu_us"] = 40.0
    acc.write_report(res, tmp_path / "out", md)
    text = md.read_text()
    assert text.count(f"<!-- bench:gpu-acceptance-{SLUG} -->") == 1 and text.count("## GPU acceptance:") == 1
    assert "other section" in text and "**not met**" in text


def test_helpers():
    assert acc.device_slug(GPU) == SLUG and acc.device_slug("Tesla T4 (PCIe)") == "Tesla_T4_PCIe"
    assert acc.parse_pytest_counts("x\nSKIPPED [1] a.py: r\n97 passed, 2 skipped, 1 xfailed in 75.21s (0:01:15)\n") == {
        "passed": 97, "skipped": 2, "xfailed": 1}
    assert acc.parse_pytest_counts("1 failed, 3 passed, 1 error, 2 warnings in 2.00s") == {
        "failed": 1, "passed": 3, "errors": 1, "warnings": 2}
    assert acc.parse_pytest_counts("no summary here") == {}
    files = [p.name for p in acc.gpu_test_files()]
    assert "test_plugin_kernels_gpu.py" in files and "test_bench_gpu_acceptance.py" not in files
    imgs = acc.synthetic_images(3, 32, seed=1)
    assert tuple(imgs.shape) == (3, 3, 32, 32) and imgs.std(dim=(1, 2, 3)).min() > 0.2
    assert (imgs.mean(dim=(1, 2, 3)).max() - imgs.mean(dim=(1, 2, 3)).min()) > 0.05  # images differ globally


def test_gpu_test_files_finds_only_marked_files(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    (tmp_path / "test_b.py").write_text("import pytest\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    (tmp_path / "test_c.py").write_text("def test_y():\n    pass\n")
    (tmp_path / "helper.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    assert [p.name for p in acc.gpu_test_files(tmp_path)] == ["test_a.py", "test_b.py"]


def test_kernel_benchmark_judges_goals_like_the_report():
    # plugins/bench_kernels.py prints its own verdicts; they must agree with the acceptance report's
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "plugins" / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    assert bk.GOAL_KMEANS_US == acc.GOAL_KMEANS_US
    for knn, fp32_km in ((24.5, 47.9), (40.0, 52.5)):
        res = synthetic()
        cases = res["steps"]["kernels"]["data"]["cases"]
        cases[0]["times_us"]["knn_kernel"]["gpu_us"] = knn
        cases[0]["kmeans_plus_knn_kernels_gpu_us"] = 31.0 + knn
        cases[0]["kmeans_plus_knn_faster_than_convs"] = 31.0 + knn < 61.0
        cases[3]["times_us"]["kmeans_kernel"]["gpu_us"] = fp32_km
        theirs = [g["met"] for g in bk.goals(cases)]
        ours = _goals(res)
        assert theirs == [ours["ti_degc_b64_fp16"]["met"], ours["kmeans_b_hr_b1"]["met"]]
