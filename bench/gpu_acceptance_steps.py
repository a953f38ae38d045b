"""The steps of ``python -m bench.gpu_acceptance``, each run in a process of its own:

    python -m bench.gpu_acceptance_steps NAME CONTEXT_JSON

started by the parent with a timeout, in a new process group (killed whole on timeout), with the
import root the parent made as working directory and PYTHONPATH (``clustervig`` imports without pip).
A hang or a sticky CUDA error so ends one step only. A step prints its progress and, as its last line,
``RESULT_MARKER`` and its result as JSON. Measurements are appended to a JSON-lines file as they are
made (the kernel cases, the model rows), so a crash or a kill keeps what was measured before it.

Importing this module imports no torch: with ``--fake-device`` (the tests, on a CPU machine) every step
runs a CPU stand-in of its GPU work through the same loops and files, and faults can be planted:
``CVIG_ACCEPTANCE_PLANT=kernels:hang,models:abort@2`` (see :func:`planted`).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
RESULT_MARKER = "@@cvig-step-result@@ "
PLANT_ENV = "CVIG_ACCEPTANCE_PLANT"

PATHS = ("static", "kernels")
MODES = ("eager-fp32", "eager-fp16", "cudagraph-fp16")
# cvig_ti at batch 512 first: the throughput goal's cell is measured before any budget runs out
FULL = {"models": [("cvig_ti", [512, 64, 1]), ("cvig_s", [256])], "repeats": 10, "warmup": 3,
        "kernel_repeats": 30, "kernel_inner": 20}
QUICK = {"models": [("cvig_ti", [8, 1]), ("cvig_s", [8])], "repeats": 3, "warmup": 1,
         "kernel_repeats": 5, "kernel_inner": 5}
SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_OPTIONS = {"memcheck": ["--leak-check", "full"], "racecheck": ["--racecheck-report", "all"],
                     "synccheck": [], "initcheck": []}
SANITIZE_DRIVER = "cvig_sanitize_kernels"  # plugins/tests/sanitize_kernels.cpp, a target of plugins/CMakeLists.txt
BUILD_TARGETS = ("cvig_kernels_host", "cvig_kernels", SANITIZE_DRIVER)
# clustervig.plugins.kernels.ENV / ENV_HOST (named here: the parent process runs without that package)
LIBRARY_ENV = {"cuda_library": "CVIG_KERNELS_LIB", "host_library": "CVIG_KERNELS_HOST_LIB"}
KERNEL_OPS = [  # (column title, op key in plugins/bench_kernels.py's results)
    ("k-means kernel", "kmeans_kernel"), ("k-means PyTorch", "kmeans_torch"),
    ("k-NN kernel", "knn_kernel"), ("masked TopK", "knn_torch_masked_topk"),
    ("segment mean kernel", "segment_mean_kernel"), ("segment mean PyTorch", "segment_mean_torch"),
    ("gather-max-rel kernel", "gather_max_rel_kernel"), ("gather-max PyTorch", "gather_max_rel_torch"),
    ("fc1 + fc2 convs", "grapher_fc1_fc2_convs"),
]
REQUIRED_MODULES = ("numpy", "torch", "pytest", "clustervig.plugins.kernels", "clustervig.plugins.reference")
OPTIONAL_MODULES = {"skimage": "the models step uses synthetic images instead of the sample photographs",
                    "PIL": "the models step uses synthetic images instead of the sample photographs"}
FAKE_DEVICE = {"name": "Fake GPU (CPU stand-in)", "capability": "9.0", "sms": 4, "memory_gib": 0.0}


def log(msg: str) -> None:
    print(f"[gpu-acceptance] {msg}", flush=True)


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "gpu"


def tail(text: Optional[str], n: int = 3000) -> str:
    return text[-n:] if text else ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


@dataclasses.dataclass
class Context:
    """What the parent tells a step: where to write, what was found, and its time (``time.time()`` seconds).

    ``soft_deadline``: start no new benchmark cell after it; ``deadline``: the parent kills the step then.
    """

    fake: bool = False
    quick: bool = False
    deadline: float = 0.0
    soft_deadline: float = 0.0
    build_dir: str = ""
    logs_dir: str = ""
    slug: str = "gpu"
    arch: Optional[str] = None
    tools: Dict[str, Dict] = dataclasses.field(default_factory=dict)

    @property
    def plan(self) -> Dict:
        return QUICK if self.quick else FULL

    def files(self) -> Dict[str, Path]:
        return log_files(Path(self.logs_dir), self.slug)

    def tool(self, name: str) -> Optional[str]:
        return (self.tools.get(name) or {}).get("path")

    def tool_timeout(self) -> float:
        """For a tool this step runs: until halfway between the soft and the hard deadline, so the
        step still records the tool's timeout itself before the parent would kill it."""
        return max(0.5, (self.soft_deadline + self.deadline) / 2 - time.time())


def log_files(logs_dir: Path, slug: str) -> Dict[str, Path]:
    """The files the steps write besides the report: partial measurements and tool logs."""
    return {"kernels": logs_dir / f"kernels_{slug}.jsonl", "models": logs_dir / f"models_{slug}.jsonl",
            "pytest_log": logs_dir / "pytest.log", "junit": logs_dir / "pytest.xml",
            "sanitizer_log": logs_dir / "sanitizer.log"}


# ----------------------------------------------------------------------------
# Planted faults (fake device only) and partial results
# ----------------------------------------------------------------------------


def planted(step: str) -> Tuple[Optional[str], int]:
    """The fault planted for ``step`` in $CVIG_ACCEPTANCE_PLANT: ``(action, after)``.

    Items ``step:action`` (at the step's start) or ``step:action@N`` (after N cells: kernel cases,
    model pairs), comma-separated. Actions: ``hang``, ``abort`` (os.abort), ``segv`` (SIGSEGV);
    ``slow`` (a stand-in kernel case takes 2 s, a model call 0.25 s), ``werror`` (build: the -Werror
    attempt fails), ``errors`` (a sanitizer reports 2 errors).
    """
    for item in os.environ.get(PLANT_ENV, "").split(","):
        name, _, what = item.strip().partition(":")
        if name == step and what:
            action, _, after = what.partition("@")
            return action, int(after or 0)
    return None, 0


def _hang() -> None:
    while True:
        time.sleep(60)


FAULTS: Dict[str, Callable[[], None]] = {
    "hang": _hang, "abort": os.abort, "segv": lambda: os.kill(os.getpid(), signal.SIGSEGV)}


def fault_point(ctx: Context, step: str, done: int) -> None:
    """Under the fake device, set off the fault planted for ``step`` once ``done`` cells are done."""
    action, after = planted(step) if ctx.fake else (None, 0)
    if action in FAULTS and after == done:
        log(f"  planted fault: {step} {action} after {done} of its cells")
        FAULTS[action]()


def append_line(path: Path, obj: Dict) -> None:
    """One JSON line, written and closed: once this returns the line survives a crash of this process."""
    with open(path, "a") as fh:
        fh.write(json.dumps(obj, default=str) + "\n")


def read_lines(path: Path) -> List[Dict]:
    """The JSON lines of a partial-results file (a last line cut short by a kill is left out)."""
    out = []
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def run_tool(cmd: List[str], ctx: Context, **kw) -> Tuple[Optional[int], str]:
    """Run a tool within the step's time: (exit status, output); the status is None when it ran out of time."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=ctx.tool_timeout(), **kw)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        return None, "".join(_text(x) for x in (exc.stdout, exc.stderr))


def show(cmd: List[str]) -> str:
    """A command for the log, with a stand-in's inline script abbreviated."""
    return " ".join("<stand-in script>" if "\n" in arg else arg for arg in cmd)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def cell_status(measured: int, failed: int, skipped: int, failures_fail: bool, what: str) -> Dict:
    """A measuring step's verdict from its cells: none measured (or, with ``failures_fail``, any failed)
    is a failure; cells left for lack of time make it partial."""
    res: Dict = {"measured": measured, "failed_cells": failed, "skipped_cells": skipped}
    if not measured or (failures_fail and failed):
        res.update(status="failed", error=f"{measured} {what} measured, {failed} failed, {skipped} skipped")
    elif skipped:
        res.update(status="partial", error=f"{skipped} {what} skipped: budget")
    return res


# ----------------------------------------------------------------------------
# preflight
# ----------------------------------------------------------------------------


def check_imports() -> Dict[str, str]:
    """"ok" or the first line of the ImportError, for each module the steps import."""
    out = {}
    for name in (*REQUIRED_MODULES, *OPTIONAL_MODULES):
        try:
            importlib.import_module(name)
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - a broken package counts as missing, with its message
            out[name] = first_line(exc)
    return out


def _driver_api() -> Optional[str]:
    """The CUDA version the driver supports (cuDriverGetVersion), e.g. "12.8"."""
    import ctypes

    try:
        ver = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(ver)) == 0:
            return f"{ver.value // 1000}.{ver.value % 1000 // 10}"
    except OSError:
        pass
    return None


def cuda_device() -> Tuple[Dict, Dict]:
    import platform

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False in the step process")
    props = torch.cuda.get_device_properties(0)
    cap = torch.cuda.get_device_capability(0)
    device = {"name": props.name, "capability": f"{cap[0]}.{cap[1]}", "sms": props.multi_processor_count,
              "memory_gib": round(props.total_memory / 2**30, 1)}
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "python": platform.python_version(), "driver_cuda": _driver_api()}
    return device, versions


def step_preflight(ctx: Context) -> Dict:
    """The device (or the fake one) and the Python modules, as the steps will see them; a device that
    cannot be queried fails the preflight but keeps the modules' report."""
    import platform

    res: Dict = {"imports": check_imports()}
    res["clustervig_from"] = getattr(sys.modules.get("clustervig.plugins.kernels"), "__file__", None)
    if ctx.fake:
        res["device"] = dict(FAKE_DEVICE)
        res["versions"] = {"python": platform.python_version(), "torch": "not used (fake device)"}
        return res
    try:
        from . import common

        res["device"], res["versions"] = cuda_device()
        res["machine"] = common.machine()
    except Exception as exc:  # noqa: BLE001 - reported in the preflight line
        res.update(status="failed", error=first_line(exc))
    return res


# ----------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------


def build_products(build_dir: Path) -> Dict[str, Path]:
    return {"cuda_library": build_dir / "libcvig_kernels.so", "host_library": build_dir / "libcvig_kernels_host.so",
            "sanitize_driver": build_dir / SANITIZE_DRIVER}


def build_commands(ctx: Context, werror: bool) -> List[List[str]]:
    """CMake configure + build of the kernel libraries and the sanitizer driver for this GPU's architecture."""
    if ctx.fake:
        fail = werror and planted("build")[0] == "werror"
        stand_in = ("import sys; print('sanitize_kernels.cpp:1: error: unused variable [-Werror=unused-variable]');"
                    " sys.exit(2)") if fail else "print('[100%] Built target (stand-in)')"
        return [[sys.executable, "-c", "print('-- Configuring done (stand-in)')"], [sys.executable, "-c", stand_in]]
    cmake, nvcc = ctx.tool("cmake"), ctx.tool("nvcc")
    if not cmake or not nvcc:
        raise RuntimeError("cmake and nvcc are needed to build the CUDA kernels: "
                           f"cmake {cmake or 'not found'}, nvcc {nvcc or 'not found'}")
    configure = [cmake, "-S", str(ROOT / "plugins"), "-B", ctx.build_dir, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCVIG_WERROR={'ON' if werror else 'OFF'}"]
    if ctx.arch:
        configure.append(f"-DCVIG_CUDA_ARCHS={ctx.arch}")
    build = [cmake, "--build", ctx.build_dir, "-j", str(os.cpu_count() or 2), "--target", *BUILD_TARGETS]
    return [configure, build]


def build_attempt(ctx: Context, werror: bool) -> Dict:
    """One configure + build; stops at the first command that fails."""
    attempt: Dict = {"werror": werror, "status": "ok", "commands": []}
    t0 = time.time()
    for cmd in build_commands(ctx, werror):
        log("  " + show(cmd))
        code, out = run_tool(cmd, ctx)
        attempt["commands"].append({"command": show(cmd), "returncode": code, "output_tail": tail(out, 4000)})
        if code != 0:
            errors = [line for line in out.splitlines() if re.search(r"\berror\b", line, re.I)][:10]
            attempt.update(status="timeout" if code is None else "failed", errors=errors,
                           error=("timed out: " if code is None else f"exit {code}: ") + (errors[0] if errors else ""))
            for line in errors:
                log("  | " + line)
            break
    attempt["seconds"] = round(time.time() - t0, 1)
    return attempt


def step_build(ctx: Context) -> Dict:
    """Build with -Werror; if that fails, once more with -DCVIG_WERROR=OFF (a warning must not cost the GPU)."""
    nvcc = ctx.tools.get("nvcc") or {}
    res: Dict = {"arch": ctx.arch, "nvcc": nvcc.get("path"), "nvcc_version": nvcc.get("version"), "attempts": []}
    for werror in (True, False):
        attempt = build_attempt(ctx, werror)
        res["attempts"].append(attempt)
        flag = "ON" if werror else "OFF"
        log(f"  attempt with -DCVIG_WERROR={flag}: {attempt['status']} in {attempt['seconds']:.0f} s")
        if attempt["status"] != "failed":
            break
    last = res["attempts"][-1]
    res["werror_off"] = not last["werror"] and last["status"] == "ok"
    products = build_products(Path(ctx.build_dir))
    res["products"] = {k: str(p) for k, p in products.items() if p.is_file()}
    missing = [] if ctx.fake else [p.name for p in products.values() if not p.is_file()]
    if last["status"] != "ok":
        res.update(status=last["status"], error=last["error"])
    elif missing:
        res.update(status="failed", error=f"not built: {', '.join(missing)} (did CMake find nvcc? see the output)")
    return res


# ----------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------

# a gpu mark applied in code (module pytestmark, decorator, pytest.param marks), not one named in a string
_GPU_MARK = re.compile(r"^\s*pytestmark\s*=[^\n]*mark\.gpu\b|^\s*pytestmark\s*=\s*\[[^\]]*mark\.gpu\b"
                       r"|^\s*@pytest\.mark\.gpu\b|^\s*marks\s*=[^\n]*mark\.gpu\b", re.M)
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)\b")
_OUTCOME = re.compile(r"::\S+.*? (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b")
_OUTCOME_KEY = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "XFAIL": "xfailed",
                "XPASS": "xpassed", "ERROR": "errors"}


def gpu_test_files(tests_dir: Path = ROOT / "tests") -> List[Path]:
    """Test files with gpu-marked tests. Passing only these to pytest keeps files that import packages a
    bare GPU machine lacks (click, polygraphy, ...) out of the collection."""
    return sorted(p for p in tests_dir.glob("test_*.py") if _GPU_MARK.search(p.read_text(errors="replace")))


def parse_pytest_counts(output: str) -> Dict[str, int]:
    """Counts from pytest's final summary line ('3 passed, 1 skipped, 2 xfailed in 4.20s')."""
    for line in reversed(output.strip().splitlines()):
        found = _COUNT.findall(line)
        if found and re.search(r"\bin [\d.]+s", line):
            out: Dict[str, int] = {}
            for n, what in found:
                key = {"error": "errors", "warning": "warnings"}.get(what, what)
                out[key] = out.get(key, 0) + int(n)
            return out
    return {}


def parse_pytest_progress(output: str) -> Dict[str, int]:
    """Counts of the outcomes ``pytest -v`` printed so far: what a killed run got through."""
    out: Dict[str, int] = {}
    for outcome in _OUTCOME.findall(output):
        key = _OUTCOME_KEY[outcome]
        out[key] = out.get(key, 0) + 1
    return out


FAKE_TESTS = '''import pytest

pytestmark = pytest.mark.gpu


def test_stand_in_passes():
    assert 1 + 1 == 2


@pytest.mark.skip(reason="a stand-in skip")
def test_stand_in_skips():
    pass
'''


def pytest_command(files: List[Path], rootdir: Path, inifile: Path, junit: Path) -> List[str]:
    # -v: one line per test, so a killed run's log shows how far it got; --continue-on-collection-errors:
    # a file that imports a package this machine lacks is an error, the other files still run
    return [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={junit}", "--rootdir", str(rootdir), "-c", str(inifile),
            *(str(f) for f in files)]


def tests_command(ctx: Context, tmp: Path) -> Tuple[List[Path], List[str]]:
    """The test files and the pytest command: the gpu-marked files of tests/, or under the fake device a
    stand-in suite written to ``tmp`` (one test passes, one is skipped)."""
    junit = ctx.files()["junit"]
    if ctx.fake:
        (tmp / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: stand-in\n")
        stand_in = tmp / "test_stand_in_gpu.py"
        stand_in.write_text(FAKE_TESTS)
        return [stand_in], pytest_command([stand_in], tmp, tmp / "pytest.ini", junit)
    files = gpu_test_files()
    if not files:
        raise RuntimeError("no test file with gpu-marked tests under tests/")
    return files, pytest_command(files, ROOT, ROOT / "pyproject.toml", junit)


def step_tests(ctx: Context) -> Dict:
    """pytest -m gpu on the gpu-marked test files; the full log and the JUnit XML go to the logs folder."""
    log_path = ctx.files()["pytest_log"]
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as fh:
        targets, cmd = tests_command(ctx, Path(tmp))
        log("  " + " ".join(cmd[1:]))
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=ctx.tool_timeout(),
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            code = None
    text = log_path.read_text(errors="replace")
    counts = parse_pytest_counts(text) or parse_pytest_progress(text)
    for line in text.strip().splitlines()[-4:]:
        log("  | " + line)
    res: Dict = {"command": " ".join(cmd[1:]), "files": [str(f) for f in targets], "returncode": code,
                 "counts": counts, "log": str(log_path), "junit": str(ctx.files()["junit"]),
                 "libraries": {env: os.environ.get(env) for env in LIBRARY_ENV.values()}}
    if code is None:
        res.update(status="timeout", error=f"pytest ran out of time; so far: {counts}")
    elif code != 0:
        res.update(status="failed", error=f"pytest exited with {code}: {counts or 'no summary line'}")
    elif not counts.get("passed"):  # everything skipped is no acceptance: the library or CUDA was not found
        res.update(status="failed", error=f"no test passed: {counts}")
    return res


# ----------------------------------------------------------------------------
# compute-sanitizer
# ----------------------------------------------------------------------------

FAKE_SANITIZER = (
    "import sys\n"
    "tool, n = sys.argv[1], int(sys.argv[2])\n"
    "print('========= COMPUTE-SANITIZER (stand-in)')\n"
    "print('sanitize_kernels: 60 launches, 0 failures')\n"
    "for i in range(n):\n"
    "    print(f'========= Invalid __global__ read of size 4 bytes (stand-in {tool} error {i + 1})')\n"
    "print(f'========= ERROR SUMMARY: {n} error' + ('' if n == 1 else 's'))\n"
    "sys.exit(1 if n else 0)\n")
_FINDING = re.compile(r"Invalid|[Hh]azard|[Rr]ace|Barrier|Uninitialized|[Ll]eak|[Ee]rror")


def parse_sanitizer(output: str) -> Dict:
    """compute-sanitizer's verdict: its ERROR SUMMARY count, the first findings, racecheck's summary,
    and the driver's own summary line."""
    counts = re.findall(r"ERROR SUMMARY: (\d+) errors?", output)
    findings = [line.strip("= ").strip() for line in output.splitlines()
                if line.startswith("=========") and _FINDING.search(line) and "SUMMARY" not in line]
    race = re.search(r"RACECHECK SUMMARY: [^\n]+", output)
    driver = re.findall(r"sanitize_kernels: \d+ launches, \d+ failures", output)
    return {"errors": int(counts[-1]) if counts else None, "first_findings": findings[:5],
            "racecheck_summary": race.group(0) if race else None, "driver_summary": driver[-1] if driver else None}


def sanitizer_command(ctx: Context, tool: str) -> List[str]:
    if ctx.fake:
        return [sys.executable, "-c", FAKE_SANITIZER, tool, "2" if planted(tool)[0] == "errors" else "0"]
    sanitizer, driver = ctx.tool("compute-sanitizer"), Path(ctx.build_dir) / SANITIZE_DRIVER
    if not sanitizer or not driver.is_file():
        raise RuntimeError(f"needs compute-sanitizer ({sanitizer or 'not found'}) and {driver} "
                           f"({'built' if driver.is_file() else 'not built'})")
    return [sanitizer, "--tool", tool, "--error-exitcode", "1", *SANITIZER_OPTIONS[tool], str(driver)]


def step_sanitize(ctx: Context, tool: str) -> Dict:
    """One compute-sanitizer tool over plugins/tests/sanitize_kernels.cpp (every launcher, small sizes)."""
    cmd = sanitizer_command(ctx, tool)
    log("  " + show(cmd))
    code, out = run_tool(cmd, ctx)
    with open(ctx.files()["sanitizer_log"], "a") as fh:
        fh.write(f"===== {tool}: {show(cmd)} (exit {code})\n{out}\n")
    res: Dict = {"tool": tool, "command": show(cmd), "returncode": code, **parse_sanitizer(out),
                 "output_tail": tail(out, 2000)}
    for key in ("driver_summary", "racecheck_summary"):
        if res[key]:
            log(f"  {res[key]}")
    if code is None:
        res.update(status="timeout", error=f"{tool} ran out of time")
    elif res["errors"] is None:
        res.update(status="failed", error=f"no ERROR SUMMARY from {tool} (exit {code}): {tail(out.strip(), 300)}")
    elif res["errors"]:
        res.update(status="failed", error=f"{res['errors']} errors; first: {(res['first_findings'] or ['?'])[0]}")
    elif code != 0:
        res.update(status="failed", error=f"the driver failed (exit {code}): {res['driver_summary'] or tail(out, 300)}")
    log(f"  {tool}: {res['errors']} errors, exit {code}")
    return res


# ----------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------


def bench_kernels_module():
    """plugins/bench_kernels.py (a script, not a package module), imported by path."""
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "plugins" / "bench_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_kernel_case(bk, cell_s: float, case) -> Dict:
    """A stand-in of bench_kernels.run_case: a sleep, and times that depend on the shape only."""
    time.sleep(cell_s)
    scale = case[1] * case[2] * case[3] / 1e5
    times = {op: {"gpu_us": round(scale * (i + 1), 2), "eager_us": round(scale * (i + 1) * 3, 2)}
             for i, (_, op) in enumerate(KERNEL_OPS)}
    return {**bk.case_entry(case), "times_us": times}


def step_kernels(ctx: Context) -> Dict:
    """plugins/bench_kernels.py's cases, each appended to kernels_<device>.jsonl as it is measured."""
    bk = bench_kernels_module()
    plan, path = ctx.plan, ctx.files()["kernels"]
    repeats, inner = plan["kernel_repeats"], plan["kernel_inner"]
    if ctx.fake:
        head = {"device": FAKE_DEVICE["name"], "library": None, "repeats": repeats, "inner": inner}
        run_one = functools.partial(fake_kernel_case, bk, 2.0 if planted("kernels")[0] == "slow" else 0.01)
    else:
        from clustervig.plugins.kernels import Kernels, cuda_library

        lib, kern = cuda_library(), Kernels()
        head = bk.header(str(lib.path), repeats, inner)
        run_one = lambda case: bk.run_case(kern, *case, repeats, inner)  # noqa: E731
    append_line(path, {"info": head})

    def on_case(cases: List[Dict]) -> None:
        append_line(path, {"case": cases[-1]})
        fault_point(ctx, "kernels", len(cases))

    cases = bk.run_plan(bk.default_plan(), run_one, ctx.soft_deadline, on_case)
    for goal in bk.goals(cases):
        log(f"  goal: {goal['goal']}: {goal['met']}")
    skipped = sum(1 for c in cases if c.get("skipped"))
    failed = sum(1 for c in cases if c.get("error"))
    return {"jsonl": str(path), **cell_status(len(cases) - skipped - failed, failed, skipped, True, "cases")}


# ----------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------


def synthetic_images(n: int, size: int, seed: int = 0):
    """Images with varied global statistics and structure (oriented waves plus noise), ImageNet-normalised scale.

    For when scikit-image/Pillow (the sample photographs) are not installed:
    pure noise would pool to one feature vector and partition unlike photos.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = 3.14159 * torch.rand(n, 1, 1, 1, generator=g)
    freq = 1 + 5 * torch.rand(n, 3, 1, 1, generator=g)
    phase = 6.28318 * torch.rand(n, 3, 1, 1, generator=g)
    wave = torch.sin(freq * 3.14159 * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
    offset = 0.5 * torch.randn(n, 3, 1, 1, generator=g)
    scale = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    return offset + scale * (wave + 0.3 * torch.randn(n, 3, size, size, generator=g))


def _have(*modules: str) -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):  # a broken or half-installed package counts as absent
        return False


def sample_images(cfg) -> Tuple[object, str]:
    if _have("skimage", "PIL"):
        from clustervig.preprocess import sample_photographs, transform_spec

        return sample_photographs(transform_spec(cfg)), "the 4 scikit-image sample photographs, tiled"
    return synthetic_images(8, cfg.img_size), "8 synthetic images, tiled (scikit-image/Pillow not installed)"


class TorchModels:
    """The models on the GPU: random weights, BatchNorm calibrated on the inputs; per path (static form,
    kernel path) an FP32 and an FP16 copy. Cells are timed with CUDA events."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device("cuda")
        self.saved_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # as timing harnesses do: cuDNN picks its fastest algorithms in warm-up
        self.inputs: Tuple[Optional[Tuple], Optional[Tuple]] = (None, None)

    def info(self) -> Dict:
        t = self.torch
        return {"settings": {"cudnn_benchmark": True, "cudnn_allow_tf32": t.backends.cudnn.allow_tf32,
                             "matmul_allow_tf32": t.backends.cuda.matmul.allow_tf32}}

    def setup(self, name: str) -> Dict:
        import copy

        import clustervig
        from clustervig.utils import calibrate_batchnorm

        self.inputs = (None, None)
        self.torch.manual_seed(0)
        base = clustervig.create_model(name)
        images, inputs = sample_images(base.cfg)
        base = base.to(self.dev)
        calibrate_batchnorm(base, [images.to(self.dev)])
        variants = {}
        for path in PATHS:
            m32 = copy.deepcopy(base).eval()
            if path == "kernels":
                m32.set_kernels(True)
            variants[path] = (m32, copy.deepcopy(m32).half())
        return {"name": name, "inputs": inputs, "images": images, "variants": variants}

    def _batch(self, model: Dict, b: int) -> Tuple:
        """FP32 and FP16 inputs of batch b (the images tiled), made once per model and batch."""
        if self.inputs[0] != (model["name"], b):
            self.inputs = (None, None)
            images = model["images"]
            x32 = images.repeat(-(-b // len(images)), 1, 1, 1)[:b].contiguous().to(self.dev)
            self.inputs = ((model["name"], b), (x32, x32.half()))
        return self.inputs[1]

    def cells(self, model: Dict, b: int, mode: str) -> Tuple[Dict, Dict]:
        """The static and kernel cells of one batch and mode: ({path: call}, {path: failure})."""
        from . import common

        try:
            x32, x16 = self._batch(model, b)
        except Exception as exc:  # noqa: BLE001 - e.g. the batch's input alone does not fit
            return {}, {path: self.describe(exc) for path in PATHS}
        cells, failed = {}, {}
        for path, (m32, m16) in model["variants"].items():
            try:
                if mode == "cudagraph-fp16":
                    cells[path] = common.cuda_graphed(m16, x16)
                else:
                    cells[path] = functools.partial(self._infer, m32 if mode == "eager-fp32" else m16,
                                                    x32 if mode == "eager-fp32" else x16)
            except Exception as exc:  # noqa: BLE001 - per cell (OOM, capture refused, ...)
                failed[path] = self.describe(exc)
                if "error" in failed[path] and mode.startswith("cudagraph"):
                    failed[path]["error"] = "CUDA-graph capture failed: " + failed[path]["error"]
                self.release()
        return cells, failed

    def _infer(self, model, x):
        with self.torch.inference_mode():
            return model(x)

    def timer(self, fn: Callable[[], object]) -> float:
        a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3

    def describe(self, exc: BaseException) -> Dict:
        return {"oom": True} if isinstance(exc, self.torch.cuda.OutOfMemoryError) else {"error": first_line(exc)}

    def release(self) -> None:
        gc.collect()
        self.torch.cuda.empty_cache()

    def close(self) -> None:
        self.torch.backends.cudnn.benchmark = self.saved_benchmark


class FakeModels:
    """CPU stand-in of TorchModels: every cell is a sleep, timed by the same loop."""

    def __init__(self, cell_s: float) -> None:
        self.cell_s = cell_s

    def info(self) -> Dict:
        return {"settings": {"fake_device": True}}

    def setup(self, name: str) -> Dict:
        return {"name": name, "inputs": "none (fake device: every call is a sleep)"}

    def cells(self, model: Dict, b: int, mode: str) -> Tuple[Dict, Dict]:
        return {path: functools.partial(time.sleep, self.cell_s) for path in PATHS}, {}

    def timer(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def describe(self, exc: BaseException) -> Dict:
        return {"error": first_line(exc)}

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def time_cells(cells: Dict[str, Callable[[], object]], repeats: int, warmup: int, backend,
               soft_deadline: Optional[float] = None) -> Tuple[Dict[str, List[float]], Dict[str, Dict]]:
    """Time each cell in interleaved rounds (A B A B ...) so drift hits all alike.

    Returns ({cell: [seconds]}, {cell: failure}); a cell that fails is dropped and the rest go on.
    Past ``soft_deadline`` no further round starts (the first always runs).
    """
    cells, failed = dict(cells), {}

    def timed(key, fn) -> Optional[float]:
        try:
            return backend.timer(fn)
        except Exception as exc:  # noqa: BLE001 - per cell
            failed[key] = backend.describe(exc)
            cells.pop(key, None)
            backend.release()
            return None

    for _ in range(warmup):
        for key, fn in list(cells.items()):
            timed(key, fn)
    times: Dict[str, List[float]] = {key: [] for key in cells}
    for r in range(repeats):
        if r and soft_deadline is not None and time.time() > soft_deadline:
            break
        for key, fn in list(cells.items()):
            t = timed(key, fn)
            if t is not None:
                times[key].append(t)
    return {k: v for k, v in times.items() if k in cells and v}, failed


def model_row(model: str, b: int, path: str, mode: str, samples: Optional[List[float]] = None,
              failure: Optional[Dict] = None, skipped: bool = False) -> Dict:
    row: Dict = {"model": model, "batch": b, "path": path, "mode": mode}
    if skipped:
        row["skipped"] = "budget"
    elif samples:
        med = statistics.median(samples)
        row.update(median_s=med, min_s=min(samples), max_s=max(samples), throughput_img_s=b / med, rounds=len(samples))
    else:
        row.update(failure or {"error": "not timed"})
    return row


class RowSink:
    """Appends each model row to models_<device>.jsonl as it is measured (and logs it); after each
    pair of cells, the fake device's planted fault may go off."""

    def __init__(self, path: Path, ctx: Context) -> None:
        self.path, self.ctx, self.rows, self.pairs = path, ctx, [], 0

    def info(self, info: Dict) -> None:
        append_line(self.path, {"info": info})

    def add(self, row: Dict) -> None:
        append_line(self.path, {"row": row})
        self.rows.append(row)
        what = (f"{row['median_s'] * 1e3:9.2f} ms {row['throughput_img_s']:10.1f} img/s" if "median_s" in row else
                "skipped: budget" if row.get("skipped") else "OOM" if row.get("oom") else row.get("error"))
        log(f"  {row['model']:<8} b={row['batch']:<4} {row['path']:<8} {row['mode']:<15} {what}")

    def pair(self, model: str, b: int, mode: str, times: Dict, failed: Dict) -> None:
        for path in PATHS:
            self.add(model_row(model, b, path, mode, times.get(path), failed.get(path)))
        self.pairs += 1
        fault_point(self.ctx, "models", self.pairs)

    def rest(self, model: str, pairs: List[Tuple[int, str]], failure: Optional[Dict] = None) -> None:
        """Rows for pairs not measured: skipped for the budget, or all failing the same way."""
        for b, mode in pairs:
            for path in PATHS:
                self.add(model_row(model, b, path, mode, failure=failure, skipped=failure is None))


def measure_models(backend, plan: Dict, soft_deadline: float, sink: RowSink) -> None:
    """Every model, batch and mode of the plan, static and kernel path timed together (interleaved);
    a pair whose expected time (the last pair's) would end past ``soft_deadline`` is skipped."""
    last_s = 0.0
    for name, batches in plan["models"]:
        pairs = [(b, mode) for b in batches for mode in MODES]
        if time.time() + last_s > soft_deadline:
            sink.rest(name, pairs)
            continue
        try:
            model = backend.setup(name)
        except Exception as exc:  # noqa: BLE001 - this model's rows say why; the next model still runs
            log(f"  {name}: could not be set up: {first_line(exc)}")
            sink.rest(name, pairs, backend.describe(exc))
            backend.release()
            continue
        sink.info({"inputs": model["inputs"]})
        for i, (b, mode) in enumerate(pairs):
            if time.time() + last_s > soft_deadline:
                sink.rest(name, pairs[i:])
                break
            t0 = time.time()
            cells, failed = backend.cells(model, b, mode)
            times, late = time_cells(cells, plan["repeats"], plan["warmup"], backend, soft_deadline)
            del cells
            backend.release()
            sink.pair(name, b, mode, times, {**failed, **late})
            last_s = time.time() - t0
        del model
        backend.release()


def step_models(ctx: Context) -> Dict:
    """Whole-model throughput; each row appended to models_<device>.jsonl as it is measured."""
    plan, path = ctx.plan, ctx.files()["models"]
    backend = FakeModels(0.25 if planted("models")[0] == "slow" else 0.005) if ctx.fake else TorchModels()
    sink = RowSink(path, ctx)
    sink.info({"repeats": plan["repeats"], "warmup": plan["warmup"], **backend.info()})
    try:
        measure_models(backend, plan, ctx.soft_deadline, sink)
    finally:
        backend.close()
    rows = sink.rows
    measured = sum(1 for r in rows if r.get("throughput_img_s"))
    skipped = sum(1 for r in rows if r.get("skipped"))
    return {"jsonl": str(path), **cell_status(measured, len(rows) - measured - skipped, skipped, False, "cells")}


# ----------------------------------------------------------------------------
# The step process
# ----------------------------------------------------------------------------

STEPS: Dict[str, Callable[[Context], Dict]] = {
    "preflight": step_preflight, "build": step_build, "tests": step_tests, "kernels": step_kernels,
    "models": step_models, **{tool: functools.partial(step_sanitize, tool=tool) for tool in SANITIZERS}}


def main(argv: Optional[List[str]] = None) -> int:
    """Run one step; its result is the last line of the output (RESULT_MARKER + JSON), even on failure."""
    name, context = sys.argv[1:3] if argv is None else argv[:2]
    ctx = Context(**json.loads(context))
    fault_point(ctx, name, 0)
    try:
        res = STEPS[name](ctx) or {}
        res.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - the step failed; the parent records why and goes on
        res = {"status": "failed", "error": first_line(exc), "traceback": tail(traceback.format_exc(), 3000)}
        log(f"  {name} failed: {res['error']}")
    print(RESULT_MARKER + json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
