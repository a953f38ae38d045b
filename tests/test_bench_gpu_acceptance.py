"""python -m bench.gpu_acceptance on a CPU machine.

* the no-GPU exit (code 2, one line, nothing written) and --help;
* whole runs on the fake device (CPU stand-ins of every step, faults planted with $CVIG_ACCEPTANCE_PLANT):
  a hang, a SIGSEGV and an abort end their step only, the run finishes within its --budget, exits 1 and
  keeps every finished step's results and the cells measured before a crash, in the JSON and the
  BENCHMARKS.md section, in at most 7 flat files; the preflight line comes first;
* the pieces: the budget's shares, killing a step's whole process group, the import root that replaces
  pip, the real tests step collecting the gpu tests through it without the optional packages, the
  parsers, the build's -DCVIG_WERROR option, the sanitizer driver (compiled by nvcc), the cell loops'
  time checks;
* the report (goals, tables) from synthetic results.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import re
import time
from pathlib import Path

import pytest

from bench import gpu_acceptance as acc
from bench import gpu_acceptance_steps as steps

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"
SLUG = "NVIDIA_H100_80GB_HBM3"
FAKE_SLUG = acc.device_slug(steps.FAKE_DEVICE["name"])


# `python -m bench.gpu_acceptance` as on a machine where the project is not pip-installed: without the
# editable install's import hook, `clustervig` is the repository's folder, which lacks clustervig.plugins
WITHOUT_PIP_INSTALL = ("import runpy, sys; sys.meta_path[:] = "
                       "[f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
                       "runpy.run_module('bench.gpu_acceptance', run_name='__main__', alter_sys=True)")


def _cli(*args, env_extra=None, timeout=300, installed=True):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    env.pop(steps.PLANT_ENV, None)
    env.update(env_extra or {})
    command = ["-m", "bench.gpu_acceptance"] if installed else ["-c", WITHOUT_PIP_INSTALL]
    return subprocess.run([sys.executable, *command, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


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
    for opt in ("--quick", "--skip-build", "--skip-tests", "--out", "--budget"):
        assert opt in r.stdout
    assert 'timeout 540 python -m bench.gpu_acceptance --out "$OUT" 2>&1 | tee "$OUT/log.txt"' in r.stdout
    assert "--fake-device" not in r.stdout and "--build-dir" not in r.stdout  # test hooks stay hidden
    assert "no CUDA GPU" not in r.stdout + r.stderr


# ----------------------------------------------------------------------------
# Whole runs on the fake device
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FakeRun:
    proc: subprocess.CompletedProcess
    wall_s: float
    out: Path

    @property
    def results(self):
        return json.loads((self.out / f"gpu_acceptance_{FAKE_SLUG}.json").read_text())

    @property
    def markdown(self):
        return (self.out / "BENCHMARKS.md").read_text()

    def status(self):
        return {name: s["status"] for name, s in self.results["steps"].items()}


def _fake_run(tmp_path, plant="", *args, budget=30):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _cli("--fake-device", "--quick", "--budget", str(budget), "--out", str(out),
                "--build-dir", str(tmp_path / "build"), *args, env_extra={steps.PLANT_ENV: plant}, timeout=budget + 60,
                installed=False)
    run = FakeRun(proc, time.monotonic() - t0, out)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # what the lent machine's command needs: within the budget, the preflight line first, at most 7 flat files
    assert run.wall_s < budget + 3, run.wall_s
    assert proc.stdout.splitlines()[0].startswith("[gpu-acceptance] preflight: GPU Fake GPU (CPU stand-in)")
    files = sorted(out.iterdir())
    assert len(files) <= 7 and all(f.is_file() and not f.is_symlink() for f in files), files
    return run


def test_fake_run_all_steps_pass(tmp_path):
    run = _fake_run(tmp_path)
    assert run.proc.returncode == 0, run.proc.stdout
    assert set(run.status().values()) == {"ok"} and list(run.status()) == [n for n, _ in acc.STEP_WEIGHTS]
    assert sorted(p.name for p in run.out.iterdir()) == sorted(
        ["BENCHMARKS.md", f"gpu_acceptance_{FAKE_SLUG}.json", f"kernels_{FAKE_SLUG}.jsonl",
         f"models_{FAKE_SLUG}.jsonl", "pytest.log", "pytest.xml", "sanitizer.log"])
    res = run.results
    assert res["preflight"]["lines"][0] == run.proc.stdout.splitlines()[0].removeprefix("[gpu-acceptance] ")
    assert res["preflight"]["imports"]["clustervig.plugins.kernels"] == "ok"
    assert res["preflight"]["clustervig_from"].startswith(str(tmp_path / "build" / "python"))  # not pip's
    assert res["steps"]["tests"]["counts"] == {"passed": 1, "skipped": 1}
    assert "<testsuite" in (run.out / "pytest.xml").read_text()
    assert [res["steps"][t]["errors"] for t in steps.SANITIZERS] == [0] * 4
    assert all(f"===== {t}:" in (run.out / "sanitizer.log").read_text() for t in steps.SANITIZERS)
    assert len(res["steps"]["kernels"]["data"]["cases"]) == 4  # ti and b_hr DEGC, FP16 and FP32
    assert len(res["steps"]["models"]["rows"]) == 3 * 3 * 2  # quick: 3 batches, 3 modes, 2 paths
    assert len(_table(run.markdown, "| model | batch |")) == 9 and len(_table(run.markdown, "| case |")) == 4
    assert res["steps"]["build"]["attempts"][0]["werror"] is True and len(res["steps"]["build"]["attempts"]) == 1


def test_fake_run_hang_and_crashes_end_their_steps_only(tmp_path):
    run = _fake_run(tmp_path, "racecheck:hang,kernels:segv@1,models:abort@2")
    assert run.proc.returncode == 1
    status = run.status()
    assert status == {"build": "ok", "tests": "ok", "memcheck": "ok", "racecheck": "timeout", "synccheck": "ok",
                      "initcheck": "ok", "kernels": "crashed", "models": "crashed"}
    res = run.results
    race = res["steps"]["racecheck"]
    assert "planted fault: racecheck hang" in race["output_tail"] and race["seconds"] >= race["timeout_s"] - 0.5
    assert "SIGSEGV" in res["steps"]["kernels"]["error"] and "SIGABRT" in res["steps"]["models"]["error"]
    # what was measured before the crashes is kept: 1 kernel case, 2 pairs of model cells
    assert [c["name"] for c in res["steps"]["kernels"]["data"]["cases"]] == ["cvig_ti DEGC"]
    rows = res["steps"]["models"]["rows"]
    assert [(r["batch"], r["path"], r["mode"]) for r in rows] == [
        (8, "static", "eager-fp32"), (8, "kernels", "eager-fp32"), (8, "static", "eager-fp16"),
        (8, "kernels", "eager-fp16")] and all(r["throughput_img_s"] > 0 for r in rows)
    md = run.markdown
    table = {r[0]: r[1:] for r in _table(md, "| step |")}
    assert table["racecheck"][0] == "timeout" and table["kernels"][0] == "crashed" and table["models"][0] == "crashed"
    assert len(_table(md, "| case |")) == 1
    assert [(r[1], r[2]) for r in _table(md, "| model | batch |")] == [("8", "eager-fp32"), ("8", "eager-fp16")]
    assert "not passed: racecheck (timeout), kernels (crashed), models (crashed)" in run.proc.stdout


def test_fake_run_build_retry_sanitizer_errors_and_budget_cut(tmp_path):
    run = _fake_run(tmp_path, "build:werror,memcheck:errors,tests:abort,kernels:slow")
    assert run.proc.returncode == 1
    res = run.results
    build = res["steps"]["build"]
    assert build["status"] == "ok" and build["werror_off"] is True
    assert [(a["werror"], a["status"]) for a in build["attempts"]] == [(True, "failed"), (False, "ok")]
    assert "-Werror=unused-variable" in build["attempts"][0]["error"]
    mem = res["steps"]["memcheck"]
    assert mem["status"] == "failed" and mem["errors"] == 2 and mem["first_findings"][0].startswith("Invalid __global__")
    assert "ERROR SUMMARY: 2 errors" in (run.out / "sanitizer.log").read_text()
    assert res["steps"]["tests"]["status"] == "crashed"
    # stand-in cases of 2 s against a few seconds of time: the rest are recorded as skipped, not lost
    kern = res["steps"]["kernels"]
    cases = kern["data"]["cases"]
    assert kern["status"] == "partial" and len(cases) == 4
    skipped = [c for c in cases if c.get("skipped")]
    assert skipped and all(c["skipped"] == "budget" for c in skipped) and len(skipped) < 4
    assert any("(skipped: budget)" in r[0] for r in _table(run.markdown, "| case |"))
    assert res["steps"]["models"]["status"] == "ok"
    md_steps = {r[0]: r[1:] for r in _table(run.markdown, "| step |")}
    assert "built with -DCVIG_WERROR=OFF" in md_steps["build"][2] and md_steps["memcheck"][0] == "failed"


def test_fake_run_skip_options(tmp_path):
    run = _fake_run(tmp_path, "", "--skip-build", "--skip-tests")
    assert run.proc.returncode == 0, run.proc.stdout
    status = run.status()
    assert status["build"] == status["tests"] == "skipped" and status["models"] == "ok"
    assert not (run.out / "pytest.log").exists()


# ----------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------


def test_budget_shares_leave_every_later_step_its_share():
    now = [0.0]
    b = acc.Budget(100.0, clock=lambda: now[0])
    assert b.reserve == 10.0 and b.left() == 90.0
    weights = [w for _, w in acc.STEP_WEIGHTS]
    total = 0.0
    for i, w in enumerate(weights):
        t = b.share(w, sum(weights[i + 1:]))
        assert 0 < t <= b.left()
        now[0] += t  # every step takes all of its time
        total += t
    assert total == pytest.approx(90.0) and b.left() == pytest.approx(0.0)
    assert acc.Budget(420).reserve == acc.REPORT_RESERVE_S
    now[0] = 500.0
    assert b.share(10, 0) == 0.0  # past the budget: nothing, never negative


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan may wait for a container's init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_run_child_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    child = acc.run_child([sys.executable, "-c", script], 2.0, dict(os.environ), tmp_path, echo=False)
    assert child.timed_out and time.monotonic() - t0 < 2.0 + acc.KILL_GRACE_S + 2
    assert "started" in child.output and child.result is None
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _running(grandchild)
    assert acc.child_result(child, 2.0)["status"] == "timeout"
    # a result line is taken from the output, not echoed; a signal death is a crash with the signal's name
    ok = acc.run_child([sys.executable, "-c", f"print('x'); print({steps.RESULT_MARKER!r} + '{{\"status\": \"ok\"}}')"],
                       10, dict(os.environ), tmp_path, echo=False)
    assert ok.result == {"status": "ok"} and steps.RESULT_MARKER not in ok.output
    crash = acc.run_child([sys.executable, "-c", "import os; os.abort()"], 10, dict(os.environ), tmp_path, echo=False)
    assert acc.child_result(crash, 10) | {"output_tail": ""} == {
        "status": "crashed", "error": "killed by SIGABRT", "returncode": -6, "output_tail": ""}


def test_import_root_maps_the_packages_like_pyproject(tmp_path):
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    package_dir = dict(re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section, re.M))  # (no tomllib before 3.11)
    assert {f"clustervig.{k}": v for k, v in acc.PACKAGE_DIRS.items()} == {
        k: v for k, v in package_dir.items() if k != "clustervig"}
    root = acc.make_import_root(tmp_path / "python")
    code = ("import clustervig.plugins.kernels as k, clustervig.export, clustervig.runtime, clustervig.calib, bench; "
            "print(k.__file__); print(k.ROOT)")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kernels_file, kernels_root = r.stdout.split()
    assert kernels_file == str(root / "clustervig" / "plugins" / "kernels.py") and kernels_root == str(ROOT)
    acc.make_import_root(tmp_path / "python")  # rebuilt in place, the repository untouched
    assert (ROOT / "plugins" / "python" / "kernels.py").is_file()
    from clustervig.plugins import kernels

    assert steps.LIBRARY_ENV == {"cuda_library": kernels.ENV, "host_library": kernels.ENV_HOST}


BLOCKED = ("click", "PIL", "sklearn", "skimage", "onnx", "onnxruntime", "onnxruntime_extensions", "polygraphy",
           "onnx_graphsurgeon", "tritonclient", "matplotlib", "cuda", "scipy")


def test_gpu_steps_need_none_of_the_optional_packages(tmp_path):
    """As on a bare GPU machine (torch, numpy, pytest only): the step module, the kernels front end and the
    gpu test file import, through the import root, with every other dependency unimportable."""
    root = acc.make_import_root(tmp_path / "python")
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import bench.gpu_acceptance_steps, clustervig.plugins.kernels, clustervig.plugins.reference
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", {str(ROOT)!r},
                      "-c", {str(ROOT / "pyproject.toml")!r}, {str(ROOT / "tests" / "test_plugin_kernels_gpu.py")!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "tests collected" in r.stdout


def test_real_tests_step_collects_the_gpu_tests_through_the_import_root(tmp_path):
    """The tests step as on the GPU machine (not the fake): here every gpu test is skipped, which the step
    reports as a failure (no test passed), with the log and the JUnit XML written."""
    root = acc.make_import_root(tmp_path / "python")
    ctx = steps.Context(deadline=time.time() + 200, soft_deadline=time.time() + 180, build_dir=str(tmp_path),
                        logs_dir=str(tmp_path), slug="x")
    cmd = [sys.executable, "-m", "bench.gpu_acceptance_steps", "tests", json.dumps(dataclasses.asdict(ctx))]
    child = acc.run_child(cmd, 200, {**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""}, root, echo=False)
    res = child.result
    assert res["status"] == "failed" and res["error"].startswith("no test passed"), child.output
    assert res["counts"]["skipped"] >= 50 and not res["counts"].get("passed")
    assert str(ROOT / "tests" / "test_plugin_kernels_gpu.py") in res["files"]
    assert "test_status_codes SKIPPED" in (tmp_path / "pytest.log").read_text()
    assert "<testsuite" in (tmp_path / "pytest.xml").read_text()


def test_output_dirs():
    args = acc.build_parser().parse_args([])
    assert acc.output_dirs(args, Path("/b")) == (acc.common.RESULTS, acc.common.BENCHMARKS_MD, Path("/b/logs"))
    args = acc.build_parser().parse_args(["--quick"])
    assert acc.output_dirs(args, Path("/b")) == (acc.QUICK_OUT, acc.QUICK_OUT / "BENCHMARKS.md", acc.QUICK_OUT)
    args = acc.build_parser().parse_args(["--quick", "--out", "/o"])
    assert acc.output_dirs(args, Path("/b")) == (Path("/o"), Path("/o/BENCHMARKS.md"), Path("/o"))
    assert acc.build_parser().parse_args([]).budget == acc.DEFAULT_BUDGET_S <= 450


def test_planted_and_partial_lines(tmp_path, monkeypatch):
    monkeypatch.setenv(steps.PLANT_ENV, "kernels:hang, models:abort@2,build:werror")
    assert steps.planted("kernels") == ("hang", 0) and steps.planted("models") == ("abort", 2)
    assert steps.planted("build") == ("werror", 0) and steps.planted("tests") == (None, 0)
    steps.fault_point(steps.Context(fake=False), "kernels", 0)  # never on a real device: returns
    path = tmp_path / "x.jsonl"
    steps.append_line(path, {"row": 1})
    steps.append_line(path, {"row": 2})
    with open(path, "a") as fh:
        fh.write('{"row": 3')  # cut short by a kill
    assert steps.read_lines(path) == [{"row": 1}, {"row": 2}]


def test_cell_loops_start_nothing_past_the_soft_deadline(tmp_path):
    ctx = steps.Context(fake=True)
    sink = steps.RowSink(tmp_path / "models.jsonl", ctx)
    t0 = time.time()
    steps.measure_models(steps.FakeModels(0.05), steps.QUICK, t0 + 1.0, sink)  # a pair takes ~0.4 s
    rows = sink.rows
    assert len(rows) == 18 and time.time() - t0 < 2.0
    measured = [r for r in rows if r.get("throughput_img_s")]
    skipped = [r for r in rows if r.get("skipped")]
    assert 2 <= len(measured) <= 6 and len(measured) + len(skipped) == 18
    assert rows.index(skipped[0]) == len(measured)  # measured first, then skipped to the end
    assert [line["row"] for line in steps.read_lines(tmp_path / "models.jsonl") if "row" in line] == rows
    # the kernel benchmark's loop does the same with its cases
    bk = steps.bench_kernels_module()
    t0 = time.time()
    cases = bk.run_plan(bk.default_plan(), lambda case: steps.fake_kernel_case(bk, 0.3, case), t0 + 0.7)
    assert [bool(c.get("skipped")) for c in cases] == [False, False, True, True]
    assert cases[2]["skipped"] == "budget" and cases[2]["times_us"] == {}


def test_parsers():
    clean = "========= COMPUTE-SANITIZER\nsanitize_kernels: 62 launches, 0 failures\n========= ERROR SUMMARY: 0 errors\n"
    assert steps.parse_sanitizer(clean) == {"errors": 0, "first_findings": [], "racecheck_summary": None,
                                            "driver_summary": "sanitize_kernels: 62 launches, 0 failures"}
    race = ("========= Error: Race reported between Write access at kmeans_kernel+0x1f0\n"
            "=========     and Read access at kmeans_kernel+0x2a0 [16 hazards]\n"
            "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
            "========= ERROR SUMMARY: 1 error\n")
    got = steps.parse_sanitizer(race)
    assert got["errors"] == 1 and got["first_findings"][0].startswith("Error: Race reported")
    assert got["racecheck_summary"] == "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"
    assert steps.parse_sanitizer("segfault")["errors"] is None
    progress = ("t.py::test_a PASSED   [ 33%]\nt.py::test_b[x-1] FAILED   [ 66%]\n"
                "t.py::test_c SKIPPED (no GPU)   [100%]\nt.py::test_d XFAIL\n")
    assert steps.parse_pytest_progress(progress) == {"passed": 1, "failed": 1, "skipped": 1, "xfailed": 1}


def test_real_build_and_sanitizer_commands():
    ctx = steps.Context(build_dir="/b", arch="90", tools={"cmake": {"path": "/c/cmake"}, "nvcc": {"path": "/n/nvcc"},
                                                         "compute-sanitizer": {"path": "/s/compute-sanitizer"}})
    configure, build = steps.build_commands(ctx, werror=True)
    assert configure[:5] == ["/c/cmake", "-S", str(ROOT / "plugins"), "-B", "/b"]
    assert {"-DCVIG_WERROR=ON", "-DCVIG_CUDA_ARCHS=90", "-DCMAKE_CUDA_COMPILER=/n/nvcc"} <= set(configure)
    assert "-DCVIG_WERROR=OFF" in steps.build_commands(ctx, werror=False)[0]
    assert build[-4:] == ["--target", "cvig_kernels_host", "cvig_kernels", "cvig_sanitize_kernels"]
    with pytest.raises(RuntimeError, match="not built"):  # no driver in /b
        steps.sanitizer_command(ctx, "racecheck")
    with pytest.raises(RuntimeError, match="cmake and nvcc"):
        steps.build_commands(dataclasses.replace(ctx, tools={}), werror=True)


def test_sanitizer_options(tmp_path):
    driver = tmp_path / steps.SANITIZE_DRIVER
    driver.write_text("")
    ctx = steps.Context(build_dir=str(tmp_path), tools={"compute-sanitizer": {"path": "/s/cs"}})
    cmds = {t: steps.sanitizer_command(ctx, t) for t in steps.SANITIZERS}
    for tool, cmd in cmds.items():
        assert cmd[:5] == ["/s/cs", "--tool", tool, "--error-exitcode", "1"] and cmd[-1] == str(driver)
    assert "--racecheck-report" in cmds["racecheck"] and "--leak-check" in cmds["memcheck"]


def test_werror_option_and_sanitizer_target_of_the_cmake_build(tmp_path):
    """-DCVIG_WERROR=OFF drops -Werror from the host, CUDA and driver flags (configure only, with nvcc)."""
    for tool in ("cmake", "nvcc"):
        assert shutil.which(tool), f"{tool} is required (CI installs it)"
    flags = {}
    for werror in ("ON", "OFF"):
        r = subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(tmp_path), "-DCVIG_CUDA_ARCHS=90",
                            f"-DCVIG_WERROR={werror}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        commands = json.loads((tmp_path / "compile_commands.json").read_text())
        flags[werror] = {Path(c["file"]).name: c["command"] for c in commands}
    assert set(flags["ON"]) == {"kmeans_host.cpp", "knn_host.cpp", "segment_host.cpp", "kmeans_kernel.cu",
                                "knn_kernel.cu", "segment_kernels.cu", "sanitize_kernels.cpp"}
    assert all("-Werror" in c and "-Wall" in c for c in flags["ON"].values())
    assert all("-Werror" not in c and "-Wall" in c for c in flags["OFF"].values())


def test_sanitizer_driver_compiles_with_nvcc(tmp_path):
    """plugins/tests/sanitize_kernels.cpp compiles with -Werror and links against the C ABI (here the host
    library's, which has the same symbols); without a GPU it says so and exits 2."""
    from clustervig.plugins.kernels import find_host_library

    nvcc = acc.find_nvcc()
    assert nvcc, "nvcc is required to compile the sanitizer driver (CI installs it)"
    shutil.copyfile(find_host_library(), tmp_path / "libcvig_kernels_host.so")
    exe = tmp_path / "sanitize_kernels"
    r = subprocess.run([nvcc, "-std=c++17", "-Xcompiler=-Wall,-Wextra,-Werror", f"-I{ROOT / 'plugins' / 'common'}",
                        str(ROOT / "plugins" / "tests" / "sanitize_kernels.cpp"), f"-L{tmp_path}", "-lcvig_kernels_host",
                        f"-Xlinker=-rpath={tmp_path}", "-o", str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # never the host library on device buffers
    assert run.returncode == 2 and run.stdout.startswith("no usable CUDA device"), run.stdout + run.stderr


def test_preflight_lines_name_each_missing_tool_once():
    tools = {"nvcc": {"path": "/n/nvcc", "version": "release 13.0"}, "cmake": {"path": None, "version": None},
             "compute-sanitizer": {"path": None, "version": None}, "nvidia-smi": {"path": None},
             "pip": {"path": None, "module": "No module named pip"}}
    pre = {"status": "ok", "device": {"name": GPU, "capability": "9.0", "sms": 132, "memory_gib": 79.1},
           "versions": {"torch": "2.13", "cuda": "13.0", "python": "3.12"},
           "imports": {"numpy": "ok", "skimage": "ModuleNotFoundError: No module named 'skimage'"}}
    lines = acc.preflight_lines(pre, tools, 420)
    assert lines[0].startswith(f"preflight: GPU {GPU} (compute capability 9.0, 132 SMs, 79.1 GiB)")
    assert "pip not found (python -m pip: No module named pip; not needed)" in lines[0]
    assert lines[1:] == [
        "preflight: missing cmake (not on PATH nor in the CUDA folders): the build step fails",
        "preflight: missing compute-sanitizer (not on PATH nor in the CUDA folders): the memcheck, racecheck, "
        "synccheck and initcheck steps are skipped",
        "preflight: missing python module skimage (ModuleNotFoundError: No module named 'skimage'): the models step "
        "uses synthetic images instead of the sample photographs"]
    assert all("\n" not in line and "Traceback" not in line for line in lines)
    # a device that cannot be queried: said in the line, and once more on its own line
    failed = {"status": "failed", "error": "RuntimeError: CUDA error: unknown error", "imports": {"numpy": "ok"}}
    lines = acc.preflight_lines(failed, tools, 420)
    assert lines[0].startswith("preflight: GPU unknown (RuntimeError: CUDA error: unknown error); ")
    assert lines[-1] == "preflight: the preflight process failed: RuntimeError: CUDA error: unknown error"


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
             _row("cvig_s", 256, "static", "cudagraph-fp16", error=CAPTURE_ERR),
             _row("cvig_s", 256, "static", "eager-fp16", skipped="budget"),
             _row("cvig_s", 256, "kernels", "eager-fp16", skipped="budget")]
    return {
        "command": "python -m bench.gpu_acceptance",
        "date": "2026-12-01T10:00:00+00:00",
        "device": {"name": GPU, "capability": "9.0", "sms": 132, "memory_gib": 79.1},
        "versions": {"torch": "2.13.0+cu130", "cuda": "13.0"},
        "steps": {
            "build": {"status": "ok", "seconds": 70.0, "arch": "90", "nvcc_version": "release 13.0, V13.0.88"},
            "tests": {"status": "ok", "seconds": 95.0, "counts": {"passed": 97, "xfailed": 1, "skipped": 1}},
            "memcheck": {"status": "ok", "seconds": 6.0, "errors": 0,
                         "driver_summary": "sanitize_kernels: 62 launches, 0 failures"},
            "racecheck": {"status": "failed", "seconds": 21.0, "errors": 1,
                          "error": "1 errors; first: Error: Race reported",
                          "racecheck_summary": "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"},
            "synccheck": {"status": "timeout", "seconds": 15.0,
                          "error": "no result within its 15 s: its processes were killed"},
            "kernels": {"status": "ok", "seconds": 40.0,
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
    step_rows = {r[0]: r for r in _table(md, "| step |")}
    assert list(step_rows) == ["build", "tests", "memcheck", "racecheck", "synccheck", "kernels", "models"]
    assert step_rows["build"][1:] == ["ok", "70", "sm_90, release 13.0, V13.0.88"]
    assert step_rows["tests"][1:3] == ["ok", "95"] and step_rows["tests"][3] == "97 passed, 1 xfailed, 1 skipped"
    assert step_rows["memcheck"][1:] == ["ok", "6", "0 errors; sanitize_kernels: 62 launches, 0 failures"]
    assert step_rows["racecheck"][1:] == ["failed", "21", "1 errors; first: Error: Race reported"]
    assert step_rows["synccheck"][1] == "timeout" and step_rows["synccheck"][3].startswith("no result within")
    assert step_rows["kernels"][3] == "4 cases"
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
    assert models[("cvig_ti", "512", "eager-fp16")] == ["2,500", "3,750", "1.50x"]
    assert models[("cvig_ti", "512", "cudagraph-fp16")] == ["error [1]", "5,120", "—"]
    assert models[("cvig_ti", "1", "eager-fp32")] == ["95.3", "190.5", "2.00x"]
    assert models[("cvig_s", "256", "eager-fp32")] == ["OOM", "900.0", "—"]
    assert models[("cvig_s", "256", "cudagraph-fp16")] == ["error [1]", "—", "—"]  # same message, one note
    assert models[("cvig_s", "256", "eager-fp16")] == ["skipped: budget", "skipped: budget", "—"]
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
    assert steps.parse_pytest_counts("x\nSKIPPED [1] a.py: r\n97 passed, 2 skipped, 1 xfailed in 75.21s (0:01:15)\n") == {
        "passed": 97, "skipped": 2, "xfailed": 1}
    assert steps.parse_pytest_counts("1 failed, 3 passed, 1 error, 2 warnings in 2.00s") == {
        "failed": 1, "passed": 3, "errors": 1, "warnings": 2}
    assert steps.parse_pytest_counts("no summary here") == {}
    files = [p.name for p in steps.gpu_test_files()]
    assert "test_plugin_kernels_gpu.py" in files and "test_bench_gpu_acceptance.py" not in files
    imgs = steps.synthetic_images(3, 32, seed=1)
    assert tuple(imgs.shape) == (3, 3, 32, 32) and imgs.std(dim=(1, 2, 3)).min() > 0.2
    assert (imgs.mean(dim=(1, 2, 3)).max() - imgs.mean(dim=(1, 2, 3)).min()) > 0.05  # images differ globally


def test_gpu_test_files_finds_only_marked_files(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    (tmp_path / "test_b.py").write_text("import pytest\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    (tmp_path / "test_c.py").write_text("def test_y():\n    pass\n")
    (tmp_path / "helper.py").write_text("import pytest\npytestmark = pytest.mark.gpu\n")
    assert [p.name for p in steps.gpu_test_files(tmp_path)] == ["test_a.py", "test_b.py"]


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
