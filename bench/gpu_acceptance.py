"""GPU acceptance in one command, made for a lent GPU machine: it finishes within its budget and keeps
every result it got, whatever a step does. On the machine, from a checkout (no pip install needed):

    timeout 540 python -m bench.gpu_acceptance --out "$OUT" 2>&1 | tee "$OUT/log.txt"
    python -m bench.gpu_acceptance [--quick] [--skip-build] [--skip-tests] [--out DIR] [--budget SECONDS]

First a preflight line: GPU, compute capability, driver, torch, nvcc, cmake, compute-sanitizer, pip,
and one line per missing tool or module. Then the steps, each in a process of its own
(bench/gpu_acceptance_steps.py) with a timeout, killed with its whole process group when the timeout
passes: a hang or a crash ends that step only, recorded as "timeout" or "crashed" with its output.

  build      CMake: libcvig_kernels.so for this GPU's architecture, libcvig_kernels_host.so and the
             sanitizer driver (plugins/tests/sanitize_kernels.cpp) into build/gpu-acceptance/; if that
             fails, once more with -DCVIG_WERROR=OFF (both attempts recorded)
  tests      python -m pytest -v -m gpu on every test file with gpu-marked tests
             (tests/test_plugin_kernels_gpu.py): log and JUnit XML in the output folder
  memcheck, racecheck, synccheck, initcheck
             compute-sanitizer --tool X --error-exitcode 1 on the driver, which calls every launcher
             of plugins/common/cvig_kernels.h on small buffers, FP32 and FP16
  kernels    plugins/bench_kernels.py's cases: each kernel vs the PyTorch ops it replaces
  models     PyTorch CUDA throughput of cvig_ti (batch 512, 64, 1) and cvig_s (256): FP32 eager,
             FP16 eager and FP16 CUDA graph, static form and kernel path timed together

The budget (--budget, default 420 s) holds the whole run: after a reserve for the report, each step's
timeout is its share of the time left (shares by expected duration), so a step that uses all of its
time still leaves the later steps theirs; kernels and models start no cell past their time and record
the cells left as "skipped: budget". Measurements are appended to files as they are made and the
report (JSON and the BENCHMARKS.md section) is rewritten, atomically, after every step, with three
goals marked met / not met:
  - cvig_b_hr DEGC (N = 784, C = 640, kappa = 6), batch 1: k-means kernel <= 50 us
  - cvig_ti DEGC, batch 64, FP16: k-means + k-NN kernels faster than the Grapher's two 1x1 convs
  - cvig_ti, batch 512: >= 4,939 img/s (the paper's Table VI, on an RTX 6000 Ada)

--out DIR: at most 7 files, flat: gpu_acceptance_<device>.json, BENCHMARKS.md (this section only),
kernels_<device>.jsonl, models_<device>.jsonl, pytest.log, pytest.xml, sanitizer.log. Without --out
the report goes to bench/results/ and the repository's BENCHMARKS.md (the logs to build/gpu-acceptance/
logs/); --quick (small batches, few repeats) sends everything to bench/results/tmp-gpu-acceptance-quick/.
Exit code 2 without a CUDA GPU (nothing written), 1 when a step failed, timed out, crashed, was cut
short or skipped for the budget; the goals are reported, they do not change the exit code.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as _dt
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

STARTED = time.monotonic()  # before bench.common's import of torch (seconds, on a cold machine): the budget counts it

from . import common  # noqa: E402
from . import gpu_acceptance_steps as steps  # noqa: E402
from .gpu_acceptance_steps import KERNEL_OPS, MODES, SANITIZERS, device_slug, log, tail  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "gpu-acceptance"
QUICK_OUT = ROOT / "bench" / "results" / "tmp-gpu-acceptance-quick"  # /bench/results/tmp* is git-ignored

GOAL_KMEANS_US = 50.0  # cvig_b_hr DEGC k-means kernel at batch 1 (plugins/bench_kernels.py judges the same)
GOAL_TI512_IMG_S = 4939.0  # the paper's Table VI: cvig_ti at batch 512 on an RTX 6000 Ada

DEFAULT_BUDGET_S = 420.0  # 7 minutes: inside the lent machine's 8, with a minute to start up and spare
REPORT_RESERVE_S = 15.0  # kept back from every step for the kills and the last report (10% of small budgets)
PREFLIGHT_S = 60.0
MIN_STEP_FRACTION = 0.02  # a step offered less than this part of the budget (at most 1 s) is skipped
KILL_GRACE_S = 2.0  # SIGTERM, then this long, then SIGKILL
# The steps in order, each with its expected seconds on an H100 (16 cores): its share of the time left.
STEP_WEIGHTS: Tuple[Tuple[str, float], ...] = (
    ("build", 60), ("tests", 120), ("memcheck", 15), ("racecheck", 25), ("synccheck", 15), ("initcheck", 15),
    ("kernels", 45), ("models", 120))
FAILING = {"failed", "timeout", "crashed", "partial", "skipped: budget"}
# pyproject.toml's [tool.setuptools.package-dir]: clustervig.<sub> lives in <folder> of the repository
PACKAGE_DIRS = {"export": "export", "runtime": "runtime", "calib": "calib", "plugins": "plugins/python"}


# ----------------------------------------------------------------------------
# Preflight: tools, and the import root that replaces `pip install -e .`
# ----------------------------------------------------------------------------


def _version(cmd: List[str], pattern: str) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return steps.first_line(exc)
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(0).strip() if found else (out.stdout + out.stderr).strip()[-80:] or None


def find_nvcc() -> Optional[str]:
    for path in (shutil.which("nvcc"), os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if path and Path(path).is_file():
            return path
    return None


def find_sanitizer(nvcc: Optional[str]) -> Optional[str]:
    """compute-sanitizer: on PATH, beside nvcc, under $CUDA_HOME / $CUDA_PATH, /usr/local/cuda or the newest
    /usr/local/cuda-*."""
    dirs = [Path(nvcc).resolve().parent] if nvcc else []
    dirs += [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    dirs += [Path("/usr/local/cuda/bin"), Path("/usr/local/cuda/compute-sanitizer")]
    dirs += [Path(d) / "bin" for d in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    found = shutil.which("compute-sanitizer")
    return found or next((str(d / "compute-sanitizer") for d in dirs if (d / "compute-sanitizer").is_file()), None)


def find_pip() -> Dict:
    """pip on PATH, beside this Python, and as `python -m pip` (reported only: nothing here needs it)."""
    beside = Path(sys.executable).parent
    paths = [p for p in (shutil.which("pip"), shutil.which("pip3"), *(str(beside / n) for n in ("pip", "pip3")))
             if p and Path(p).is_file()]
    module = _version([sys.executable, "-m", "pip", "--version"], r"pip \S+|No module named \S+")
    return {"path": paths[0] if paths else None, "module": module}


def find_gpu_driver() -> Dict:
    """nvidia-smi's name, compute capability and driver version of GPU 0 (without touching CUDA here)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"path": None}
    text = _version([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"], r"[^\n]+") or ""
    parts = [p.strip() for p in text.split(",")]
    return {"path": smi, **(dict(zip(("name", "compute_cap", "driver"), parts)) if len(parts) == 3 else {"note": text})}


def find_tools() -> Dict[str, Dict]:
    nvcc = find_nvcc()
    cmake = shutil.which("cmake")
    sanitizer = find_sanitizer(nvcc)
    return {
        "nvcc": {"path": nvcc, "version": _version([nvcc, "--version"], r"release [^\n]+") if nvcc else None},
        "cmake": {"path": cmake, "version": _version([cmake, "--version"], r"\d+\.\d+\.\d+") if cmake else None},
        "compute-sanitizer": {"path": sanitizer,
                              "version": _version([sanitizer, "--version"], r"Version \S+") if sanitizer else None},
        "nvidia-smi": find_gpu_driver(),
        "pip": find_pip(),
    }


def make_import_root(dest: Path) -> Path:
    """A folder that makes `clustervig` importable as an installed package would be, without pip.

    ``clustervig/`` here holds a link to each entry of the repository's clustervig/ plus the sub-packages
    pyproject.toml maps elsewhere (clustervig.plugins -> plugins/python, ...); ``bench`` links the
    benchmarks. The step processes run with it as working directory and first on PYTHONPATH, so it wins
    over the repository root (where ``clustervig`` lacks those sub-packages). Rebuilt on every run.
    """
    if dest.exists():
        shutil.rmtree(dest)  # links only: rmtree unlinks them, it does not follow them
    pkg = dest / "clustervig"
    pkg.mkdir(parents=True)
    for entry in sorted((ROOT / "clustervig").iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub, folder in PACKAGE_DIRS.items():
        (pkg / sub).symlink_to(ROOT / folder, target_is_directory=True)
    (dest / "bench").symlink_to(ROOT / "bench", target_is_directory=True)
    return dest


def preflight_lines(pre: Dict, tools: Dict[str, Dict], budget_s: float) -> List[str]:
    """The preflight line (everything found, in one line) and one line per missing tool or module."""
    dev = pre.get("device") or {}
    ver = pre.get("versions") or {}
    smi = tools["nvidia-smi"]
    pip = tools["pip"]
    gpu = (f"GPU {dev['name']} (compute capability {dev.get('capability')}, {dev.get('sms')} SMs, "
           f"{dev.get('memory_gib')} GiB)" if dev.get("name") else f"GPU unknown ({pre.get('error', 'no preflight')})")
    parts = [gpu, f"driver {smi.get('driver', 'unknown (no nvidia-smi)')}, CUDA {ver.get('driver_cuda') or '?'}",
             f"torch {ver.get('torch', '?')} (CUDA {ver.get('cuda', '?')})", f"python {ver.get('python', '?')}"]
    for name in ("nvcc", "cmake", "compute-sanitizer"):
        t = tools[name]
        parts.append(f"{name} {t['path']} ({t['version']})" if t["path"] else f"{name} not found")
    parts.append(f"pip {pip['path'] or 'not found'} (python -m pip: {pip['module']}; not needed)")
    parts.append(f"budget {budget_s:.0f} s")
    lines = ["preflight: " + "; ".join(parts)]
    consequence = {"nvcc": "the build step fails", "cmake": "the build step fails",
                   "compute-sanitizer": "the memcheck, racecheck, synccheck and initcheck steps are skipped"}
    for name, what in consequence.items():
        if not tools[name]["path"]:
            lines.append(f"preflight: missing {name} (not on PATH nor in the CUDA folders): {what}")
    for name, state in (pre.get("imports") or {}).items():
        if state != "ok":
            what = steps.OPTIONAL_MODULES.get(name, "the steps that import it fail")
            lines.append(f"preflight: missing python module {name} ({state}): {what}")
    if pre.get("status") not in (None, "ok"):
        lines.append(f"preflight: the preflight process {pre['status']}: {pre.get('error', '')}")
    return lines


# ----------------------------------------------------------------------------
# Budget and step processes
# ----------------------------------------------------------------------------


class Budget:
    """The run's time. Each step's timeout is its weight's share of what is left after the reserve:
    a step that uses all of its time still leaves every later step its own share."""

    def __init__(self, total_s: float, clock=time.monotonic, start: Optional[float] = None) -> None:
        self.total, self.clock = total_s, clock
        self.start = clock() if start is None else start
        self.reserve = min(REPORT_RESERVE_S, 0.1 * total_s)

    def left(self) -> float:
        return self.total - (self.clock() - self.start) - self.reserve

    def share(self, weight: float, later_weights: float) -> float:
        return max(0.0, self.left()) * weight / (weight + later_weights)


def soft_margin(timeout: float) -> float:
    """How long before its kill a step stops starting cells (it finishes the one it is in)."""
    return min(10.0, 0.2 * timeout)


@dataclasses.dataclass
class Child:
    returncode: Optional[int]
    timed_out: bool
    output: str
    result: Optional[Dict]


def _kill_group(pgid: int, proc: subprocess.Popen) -> None:
    """SIGTERM to the whole process group, SIGKILL after KILL_GRACE_S (grandchildren included)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass


def run_child(cmd: List[str], timeout: float, env: Dict[str, str], cwd: Path, echo: bool = True) -> Child:
    """Run one step process in its own process group; stream its output (echoed unless ``echo`` is off);
    kill the group when ``timeout`` passes, and after the step in any case (nothing of it outlives it)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    lines: collections.deque = collections.deque(maxlen=300)
    results: List[str] = []

    def pump() -> None:
        for line in proc.stdout:
            if line.startswith(steps.RESULT_MARKER):
                results.append(line[len(steps.RESULT_MARKER):])
                continue
            lines.append(line)
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid, proc)
    reader.join(5)
    try:
        result = json.loads(results[-1]) if results else None
    except json.JSONDecodeError:
        result = None
    return Child(proc.returncode, timed_out, "".join(lines), result)


def child_result(child: Child, timeout: float) -> Dict:
    """The step's own result, or what its end says: killed at its timeout, or died without a result."""
    if child.result is not None:
        res = child.result
    elif child.timed_out:
        res = {"status": "timeout", "error": f"no result within its {timeout:.0f} s: its processes were killed"}
    elif child.returncode is not None and child.returncode < 0:
        res = {"status": "crashed", "error": f"killed by {signal.Signals(-child.returncode).name}"}
    else:
        res = {"status": "crashed", "error": f"exited with {child.returncode} without a result"}
    res["returncode"] = child.returncode
    res["output_tail"] = tail(child.output)
    return res


def collect_partial(name: str, res: Dict, files: Dict[str, Path]) -> None:
    """What a step wrote as it went (all of it, also when the step crashed or was killed)."""
    if name in ("kernels", "models"):
        lines = steps.read_lines(files[name])
        info = {k: v for line in lines for k, v in line.get("info", {}).items()}
        key = "case" if name == "kernels" else "row"
        items = [line[key] for line in lines if key in line]
        if name == "kernels":
            res["data"] = {**info, "cases": items}
        else:
            res.update(info, rows=items)
    elif name == "tests" and not res.get("counts") and files["pytest_log"].is_file():
        text = files["pytest_log"].read_text(errors="replace")
        res["counts"] = steps.parse_pytest_progress(text)
        res["log_tail"] = tail(text, 2000)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def output_dirs(args, build_dir: Path) -> Tuple[Path, Path, Path]:
    """(report folder, BENCHMARKS.md, logs folder): --out gets everything, flat; --quick its own folder;
    a full run the repository's bench/results/ and BENCHMARKS.md, its logs under the build folder."""
    if args.out:
        out = args.out.resolve()
        return out, out / "BENCHMARKS.md", out
    if args.quick:
        return QUICK_OUT, QUICK_OUT / "BENCHMARKS.md", QUICK_OUT
    return common.RESULTS, common.BENCHMARKS_MD, build_dir / "logs"


def no_gpu_reason() -> Optional[str]:
    import torch

    if torch.cuda.is_available():
        return None
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
    return (f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, {built}); "
            "run this on a machine with an NVIDIA GPU")


class Run:
    """One acceptance run: the preflight, the steps in their processes, and the report after each."""

    def __init__(self, args, argv: Sequence[str], budget: Budget) -> None:
        self.args, self.budget = args, budget
        self.build_dir = (args.build_dir or BUILD_DIR).resolve()
        self.out_dir, self.md_path, self.logs_dir = output_dirs(args, self.build_dir)
        self.import_root = self.build_dir / "python"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(self.import_root), os.environ.get("PYTHONPATH")])))
        self.ctx = steps.Context(fake=args.fake_device, quick=args.quick, build_dir=str(self.build_dir),
                                 logs_dir=str(self.logs_dir))
        plan = self.ctx.plan
        self.results: Dict = {
            "command": "python -m bench.gpu_acceptance" + "".join(f" {a}" for a in argv),
            "quick": bool(args.quick), "fake_device": bool(args.fake_device), "budget_s": budget.total,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": {"name": "unknown GPU"}, "versions": {},
            "plan": {"models": plan["models"], "repeats": plan["repeats"], "warmup": plan["warmup"]},
            "steps": {},
        }

    # -- the sequence ------------------------------------------------------------

    def execute(self) -> int:
        for folder in (self.out_dir, self.logs_dir, self.build_dir):
            folder.mkdir(parents=True, exist_ok=True)
        make_import_root(self.import_root)
        self.preflight()
        for path in self.ctx.files().values():  # never report an earlier run's measurements as this one's
            path.unlink(missing_ok=True)
        if self.args.skip_build:
            self.use_libraries()
        self.write_report()
        planned = [(name, w, self.skip_reason(name)) for name, w in STEP_WEIGHTS]
        for i, (name, weight, skip) in enumerate(planned):
            skip = skip or self.skip_reason(name, after_build=True)
            later = sum(w for _, w, s in planned[i + 1:] if not s)
            timeout = self.budget.share(weight, later)
            if skip or timeout < min(1.0, MIN_STEP_FRACTION * self.budget.total):
                status = "skipped" if skip else "skipped: budget"
                self.results["steps"][name] = {"status": status, "note": skip or f"{self.budget.left():.0f} s left"}
                log(f"step {i + 1}/{len(planned)} {name}: {status} ({self.results['steps'][name]['note']})")
            else:
                self.run_step(name, f"{i + 1}/{len(planned)}", timeout)
            if name == "build":
                self.use_libraries()
            self.write_report()
        return self.finish()

    def preflight(self) -> None:
        """Tools (here) and the device and modules (in a step process); printed before anything else."""
        tools = find_tools()
        if tools["nvidia-smi"].get("compute_cap"):
            self.ctx.arch = tools["nvidia-smi"]["compute_cap"].replace(".", "")
        self.ctx.tools = tools
        pre = self.child("preflight", min(PREFLIGHT_S, max(1.0, self.budget.left())), echo=False)
        lines = preflight_lines(pre, tools, self.budget.total)
        for line in lines:
            log(line)
        dev = pre.get("device") or {}
        if dev.get("capability"):
            self.ctx.arch = dev["capability"].replace(".", "")
        self.ctx.slug = device_slug(dev.get("name", "unknown GPU"))
        self.results.update(device=dev or self.results["device"], versions=pre.get("versions") or {},
                            machine=pre.pop("machine", None), preflight={**pre, "lines": lines, "tools": tools})
        log(f"results to {self.out_dir}, logs to {self.logs_dir}")

    def skip_reason(self, name: str, after_build: bool = False) -> Optional[str]:
        """Why a step will not run: an option, or (after the build) a tool or product it needs is missing."""
        if name == "build" and self.args.skip_build:
            return "--skip-build"
        if name == "tests" and self.args.skip_tests:
            return "--skip-tests"
        if name in SANITIZERS and not self.args.fake_device:
            if not self.ctx.tool("compute-sanitizer"):
                return "compute-sanitizer not found"
            driver = self.build_dir / steps.SANITIZE_DRIVER
            if after_build and not driver.is_file():
                return f"{driver.name} was not built"
        return None

    def use_libraries(self) -> None:
        """Point CVIG_KERNELS_LIB / CVIG_KERNELS_HOST_LIB of the later steps at this build's libraries."""
        products = steps.build_products(self.build_dir)
        for key, env in steps.LIBRARY_ENV.items():
            if products[key].is_file():
                self.env[env] = str(products[key])

    def child(self, name: str, timeout: float, echo: bool = True) -> Dict:
        now = time.time()
        ctx = dataclasses.replace(self.ctx, deadline=now + timeout, soft_deadline=now + timeout - soft_margin(timeout))
        cmd = [sys.executable, "-m", "bench.gpu_acceptance_steps", name, json.dumps(dataclasses.asdict(ctx))]
        res = child_result(run_child(cmd, timeout, self.env, self.import_root, echo), timeout)
        collect_partial(name, res, ctx.files())
        return res

    def run_step(self, name: str, index: str, timeout: float) -> None:
        log(f"step {index} {name} (timeout {timeout:.0f} s; {self.budget.left():.0f} s of the budget left) ...")
        self.results["steps"][name] = {"status": "running", "timeout_s": round(timeout, 1)}
        self.write_report()
        t0 = time.monotonic()
        res = self.child(name, timeout)
        res.update(seconds=round(time.monotonic() - t0, 1), timeout_s=round(timeout, 1))
        self.results["steps"][name] = res
        detail = f": {res['error'].splitlines()[0]}" if res.get("error") else ""
        log(f"step {index} {name}: {res['status']} in {res['seconds']:.0f} s{detail}")

    def write_report(self) -> None:
        try:
            write_report(self.results, self.out_dir, self.md_path)
        except Exception as exc:  # noqa: BLE001 - the next step's report may succeed; the run goes on
            log(f"report not written: {steps.first_line(exc)}")

    def finish(self) -> int:
        for g in self.results.get("goals", []):
            log(f"goal: {g['goal']}: {_verdict(g['met']).strip('*')} (target {g['target']}, measured {g['measured']})")
        name = self.results["device"].get("name", "unknown GPU")
        log(f"wrote {self.out_dir / ('gpu_acceptance_' + device_slug(name) + '.json')} and the "
            f"'GPU acceptance: {name}' section of {self.md_path}; {self.budget.left():.0f} s of the budget left")
        bad = [f"{n} ({s['status']})" for n, s in self.results["steps"].items() if s.get("status") in FAILING]
        if self.results.get("preflight", {}).get("status") not in (None, "ok"):
            bad.insert(0, f"preflight ({self.results['preflight']['status']})")
        log("all steps passed" if not bad else f"not passed: {', '.join(bad)}")
        return 1 if bad else 0


# ----------------------------------------------------------------------------
# Goals and rendering (pure functions of the results dict)
# ----------------------------------------------------------------------------


def _kernel_cases(results: Dict) -> List[Dict]:
    return ((results.get("steps", {}).get("kernels") or {}).get("data") or {}).get("cases") or []


def _gpu_us(case: Dict, op: str) -> Optional[float]:
    return ((case.get("times_us") or {}).get(op) or {}).get("gpu_us")


def _fmt_us(v: Optional[float]) -> str:
    return "—" if v is None else f"{v:.1f} µs"


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def evaluate_goals(results: Dict) -> List[Dict]:
    """The three acceptance goals, each with its measured numbers and met: True / False / None (not measured)."""
    goals = []
    # 1. cvig_b_hr DEGC k-means kernel at batch 1, every precision measured
    hr = [c for c in _kernel_cases(results) if c.get("name") == "cvig_b_hr DEGC" and c["shape"]["batch"] == 1]
    per = {c["dtype"]: _gpu_us(c, "kmeans_kernel") for c in hr}
    known = {k: v for k, v in per.items() if v is not None}
    if any(v > GOAL_KMEANS_US for v in known.values()):
        met = False
    elif known and len(known) == len(per):
        met = True
    else:
        met = None
    goals.append({"key": "kmeans_b_hr_b1",
                  "goal": "cvig_b_hr DEGC (N = 784, C = 640, kappa = 6), batch 1: k-means kernel (20 iterations)",
                  "target": f"<= {GOAL_KMEANS_US:g} µs", "values": per, "met": met,
                  "measured": ", ".join(f"{k.upper()} {_fmt_us(v)}" for k, v in sorted(per.items())) or "not measured"})
    # 2. cvig_ti DEGC B = 64 FP16: k-means + k-NN kernels vs the Grapher's two 1x1 convs
    ti = [c for c in _kernel_cases(results)
          if c.get("name") == "cvig_ti DEGC" and c.get("dtype") == "fp16" and c["shape"]["batch"] == 64]
    km = _gpu_us(ti[0], "kmeans_kernel") if ti else None
    nn_ = _gpu_us(ti[0], "knn_kernel") if ti else None
    convs = _gpu_us(ti[0], "grapher_fc1_fc2_convs") if ti else None
    both = km + nn_ if km is not None and nn_ is not None else None
    goals.append({"key": "ti_degc_b64_fp16",
                  "goal": "cvig_ti DEGC (N = 196, C = 192, kappa = 4, K = 9), batch 64, FP16: "
                          "k-means + k-NN kernels vs the Grapher's fc1 + fc2 1x1 convs",
                  "target": f"< {_fmt_us(convs)} (the convs)" if convs is not None else "< the convs (not measured)",
                  "values": {"kmeans_us": km, "knn_us": nn_, "kernels_us": both, "convs_us": convs},
                  "met": (both < convs) if both is not None and convs is not None else None,
                  "measured": (f"{_fmt_us(both)} (k-means {_fmt_us(km)} + k-NN {_fmt_us(nn_)})"
                               if both is not None else "not measured")})
    # 3. cvig_ti at batch 512: the best cell of any path and mode
    rows = [r for r in (results.get("steps", {}).get("models") or {}).get("rows", [])
            if r.get("model") == "cvig_ti" and r.get("batch") == 512 and r.get("throughput_img_s")]
    best = max(rows, key=lambda r: r["throughput_img_s"], default=None)
    goals.append({"key": "ti_b512_throughput",
                  "goal": "cvig_ti, batch 512, images per second (paper Table VI: 4,939 img/s on an RTX 6000 Ada)",
                  "target": f">= {_fmt_rate(GOAL_TI512_IMG_S)} img/s",
                  "values": {"best_img_s": best["throughput_img_s"] if best else None,
                             "best_cell": f"{best['path']} {best['mode']}" if best else None},
                  "met": (best["throughput_img_s"] >= GOAL_TI512_IMG_S) if best else None,
                  "measured": (f"{_fmt_rate(best['throughput_img_s'])} img/s ({best['path']}, {best['mode']})"
                               if best else "not measured")})
    return goals


def _settings(st: Optional[Dict]) -> str:
    if not st or "cudnn_benchmark" not in st:
        return ""
    onoff = {True: "on", False: "off"}
    return (f"cuDNN benchmark {onoff.get(st.get('cudnn_benchmark'), '?')}, TF32 convolutions "
            f"{onoff.get(st.get('cudnn_allow_tf32'), '?')}, TF32 matmuls {onoff.get(st.get('matmul_allow_tf32'), '?')}.")


def _verdict(met: Optional[bool]) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def _cell(row: Optional[Dict], notes: List[str]) -> str:
    if row is None:
        return "—"
    if row.get("throughput_img_s"):
        return _fmt_rate(row["throughput_img_s"])
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    if row.get("oom"):
        return "OOM"
    msg = row.get("error", "failed")
    if msg not in notes:
        notes.append(msg)
    return f"error [{notes.index(msg) + 1}]"


def _step_detail(name: str, s: Dict) -> str:
    """The steps table's detail cell: why a step did not pass, else what it found."""
    status = s.get("status", "")
    if status.startswith("skipped"):
        return s.get("note", "")
    if status != "ok" and s.get("error"):
        return s["error"].splitlines()[0][:200]
    if name == "build":
        detail = f"sm_{s.get('arch')}, {s.get('nvcc_version') or 'nvcc'}"
        if s.get("werror_off"):
            detail += f"; built with -DCVIG_WERROR=OFF (with -Werror: {s['attempts'][0].get('error', 'failed')[:120]})"
        return detail
    if name == "tests" and s.get("counts"):
        return ", ".join(f"{v} {k}" for k, v in s["counts"].items())
    if name in SANITIZERS and s.get("errors") is not None:
        return "; ".join(filter(None, [f"{s['errors']} errors", s.get("racecheck_summary"), s.get("driver_summary")]))
    if name == "kernels" and s.get("data"):
        return f"{len(s['data'].get('cases', []))} cases"
    if name == "models" and s.get("inputs"):
        return f"inputs: {s['inputs']}; median of {s.get('repeats')} rounds after {s.get('warmup')} warm-up"
    return s.get("note", "")


def _steps_table(steps_done: Dict) -> List[str]:
    lines = ["| step | status | seconds | detail |", "|---|---|---:|---|"]
    for name, _ in STEP_WEIGHTS:
        s = steps_done.get(name)
        if s is not None:
            secs = f"{s['seconds']:.0f}" if isinstance(s.get("seconds"), (int, float)) else ""
            lines.append(f"| {name} | {s.get('status', '?')} | {secs} | {_step_detail(name, s).replace('|', '/')} |")
    return lines


def _kernel_table(kernels: Dict) -> List[str]:
    data = kernels.get("data") or {}
    lines = ["", "### Plugin kernels vs the PyTorch ops they replace (GPU µs per call)", "",
             f"`plugins/bench_kernels.py`: {data.get('inner', '?')} calls captured in one CUDA graph, median of "
             f"{data.get('repeats', '?')} replays (launch overhead excluded; '(eager)': the graph could not be "
             "captured, plain launches timed).", "",
             "| case | B | N | C | kappa | K | dtype | " + " | ".join(t for t, _ in KERNEL_OPS) + " |",
             "|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(KERNEL_OPS)]
    for c in data.get("cases") or []:
        sh = c["shape"]
        cells = []
        for _, op in KERNEL_OPS:
            t = (c.get("times_us") or {}).get(op) or {}
            if t.get("gpu_us") is not None:
                cells.append(f"{t['gpu_us']:.1f}")
            elif t.get("eager_us") is not None:
                cells.append(f"{t['eager_us']:.1f} (eager)")
            else:
                cells.append("—")
        name = c["name"] + (f" (skipped: {c['skipped']})" if c.get("skipped") else " (error)" if c.get("error") else "")
        lines.append(f"| {name} | {sh['batch']} | {sh['tokens']} | {sh['dim']} | {sh['clusters']} | {sh['k']} "
                     f"| {c['dtype'].upper()} | " + " | ".join(cells) + " |")
    return lines


def _model_table(models: Dict) -> List[str]:
    rows = models.get("rows") or []
    notes: List[str] = []
    by = {(r["model"], r["batch"], r["path"], r["mode"]): r for r in rows}
    lines = ["", "### Whole model, PyTorch CUDA (images per second)", "",
             "Random weights (BatchNorm calibrated on the inputs); static: the pure static form (PyTorch ops), "
             "kernels: `set_kernels(True)` (k-means, k-NN, centroid means and gather-max on the plugin kernels); "
             "eager: one forward per call, cudagraph: the forward captured once and replayed; CUDA-event time "
             f"per call, median of {models.get('repeats', '?')} interleaved rounds of the two paths. "
             + _settings(models.get("settings")),
             "", "| model | batch | mode | static | kernels | kernels / static |", "|---|---:|---|---:|---:|---:|"]
    for model, b in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        for mode in MODES:
            st, ke = by.get((model, b, "static", mode)), by.get((model, b, "kernels", mode))
            if st is None and ke is None:
                continue
            ratio = (f"{ke['throughput_img_s'] / st['throughput_img_s']:.2f}x"
                     if st and ke and st.get("throughput_img_s") and ke.get("throughput_img_s") else "—")
            lines.append(f"| {model} | {b} | {mode} | {_cell(st, notes)} | {_cell(ke, notes)} | {ratio} |")
    if notes:
        lines += [""] + [f"[{i}] {n.replace('|', '/')}" + "  " for i, n in enumerate(notes, 1)]
    return lines


def render_markdown(results: Dict) -> str:
    dev = results.get("device", {})
    ver = results.get("versions", {})
    steps_done = results.get("steps", {})
    goals = results.get("goals") or evaluate_goals(results)
    pre = (results.get("preflight") or {}).get("lines") or []
    lines = [
        f"## GPU acceptance: {dev.get('name', 'unknown GPU')}",
        "",
        f"`{results.get('command', 'python -m bench.gpu_acceptance')}` — {results.get('date', '')}; "
        f"torch {ver.get('torch', '?')}, CUDA {ver.get('cuda', '?')}, compute capability {dev.get('capability', '?')}, "
        f"{dev.get('sms', '?')} SMs, {dev.get('memory_gib', '?')} GiB"
        + (" — **quick run** (small batches, few repeats)" if results.get("quick") else "")
        + (" — **fake device** (CPU stand-ins: no GPU measured)" if results.get("fake_device") else "")
        + f". Raw results: `gpu_acceptance_{device_slug(dev.get('name', 'gpu'))}.json`.",
    ]
    if pre:
        lines += [""] + [f"{line.replace('|', '/')}  " for line in pre]
    lines += ["", "### Goals", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    for g in goals:
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {_verdict(g['met'])} |")
    budget = f" (budget {results['budget_s']:.0f} s)" if isinstance(results.get("budget_s"), (int, float)) else ""
    lines += ["", f"### Steps{budget}", ""] + _steps_table(steps_done)
    if _kernel_cases(results):
        lines += _kernel_table(steps_done["kernels"])
    if (steps_done.get("models") or {}).get("rows"):
        lines += _model_table(steps_done["models"])
    return "\n".join(lines)


def render_json(results: Dict) -> str:
    """The results as written to gpu_acceptance_<device>.json, with the goal verdicts included."""
    return json.dumps({**results, "goals": evaluate_goals(results)}, indent=2, default=str) + "\n"


def write_report(results: Dict, out_dir: Path, md_path: Path) -> Dict:
    """gpu_acceptance_<device>.json in out_dir and this GPU's section of md_path (other sections kept),
    both replaced atomically: a kill mid-write leaves the previous report, never half of one."""
    from clustervig.utils import atomic_path, write_json_atomic

    slug = device_slug(results["device"]["name"])
    results["goals"] = evaluate_goals(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_acceptance_{slug}.json"
    write_json_atomic(path, json.loads(render_json(results)))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(md_path) as tmp_md:
        if md_path.is_file():
            shutil.copyfile(md_path, tmp_md)
        else:
            tmp_md.unlink()  # update_section starts a new file, with its heading
        common.update_section(f"gpu-acceptance-{slug}", render_markdown(results), path=tmp_md)
    return {"json": str(path), "markdown": str(md_path)}


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = common.parser("python -m bench.gpu_acceptance", __doc__)
    ap.add_argument("--quick", action="store_true", help="small batches and few repeats (smoke run)")
    ap.add_argument("--skip-build", action="store_true", help="use the libraries already in build/gpu-acceptance/")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    ap.add_argument("--out", type=Path, help="folder for every file of the run, flat (at most 7)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f})")
    # for the tests on a CPU machine: CPU stand-ins of every step (faults planted with $CVIG_ACCEPTANCE_PLANT),
    # and a build folder of their own
    ap.add_argument("--fake-device", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build-dir", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: Optional[Sequence[str]] = None, started: Optional[float] = None) -> int:
    """The command; ``started``: when the budget's clock started (the command passes its import time)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget, start=started)
    reason = None if args.fake_device else no_gpu_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    # killed from outside (`timeout 540 ...`): exit through the running step's cleanup, which kills its group
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    return Run(args, argv, budget).execute()


if __name__ == "__main__":
    raise SystemExit(main(started=STARTED))
