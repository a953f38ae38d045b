"""GPU acceptance in one command: build the kernels, run the GPU tests, time the kernels and the whole model.

    pip install --no-deps --no-build-isolation -e .
    python -m bench.gpu_acceptance [--quick] [--skip-build] [--skip-tests] [--out DIR]

Steps (each prints its progress; a failing step is recorded and the others still run):

  1 build    CMake: libcvig_kernels.so for this GPU's architecture (torch.cuda.get_device_capability,
             e.g. 90) and libcvig_kernels_host.so into build/gpu-acceptance/; CVIG_KERNELS_LIB and
             CVIG_KERNELS_HOST_LIB point at them for the rest of the run (the test subprocess included)
  2 tests    python -m pytest -q -m gpu on every test file with gpu-marked tests
             (tests/test_plugin_kernels_gpu.py and any other): counts and the output's tail
  3 kernels  plugins/bench_kernels.py: each kernel vs the PyTorch ops it replaces, cvig_ti DEGC at
             B = 64 and cvig_b_hr DEGC at B = 1, FP16 and FP32
  4 models   PyTorch CUDA, cvig_ti at batch 1/64/512 and cvig_s at batch 256: FP32 eager, FP16 eager
             and FP16 CUDA graph, for the pure static form and the kernel path (set_kernels(True));
             CUDA-event timing after warm-up, medians of interleaved rounds, images per second;
             an out-of-memory or failing cell is recorded and the others still run
  5 report   bench/results/gpu_acceptance_<device>.json and a BENCHMARKS.md section titled with the
             GPU's name, with the three goals marked met / not met:
               - cvig_b_hr DEGC (N = 784, C = 640, kappa = 6), batch 1: k-means kernel <= 50 us
               - cvig_ti DEGC, batch 64, FP16: k-means + k-NN kernels faster than the Grapher's two 1x1 convs
               - cvig_ti, batch 512: >= 4,939 img/s (the paper's Table VI, on an RTX 6000 Ada)

--quick: small batches and few repeats (a smoke run of the same code paths); its results go to
bench/results/tmp-gpu-acceptance-quick/ (with its own BENCHMARKS.md) unless --out is given.
--out DIR: JSON files and a BENCHMARKS.md with this section go to DIR instead of bench/results/
and the repository's BENCHMARKS.md. Without a CUDA GPU the command exits with code 2 and writes nothing.
Exit code 1 when a step failed; the goals are reported, they do not change the exit code.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import common

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "gpu-acceptance"
QUICK_OUT = ROOT / "bench" / "results" / "tmp-gpu-acceptance-quick"  # /bench/results/tmp* is git-ignored

GOAL_KMEANS_US = 50.0  # cvig_b_hr DEGC k-means kernel at batch 1 (plugins/bench_kernels.py judges the same)
GOAL_TI512_IMG_S = 4939.0  # the paper's Table VI: cvig_ti at batch 512 on an RTX 6000 Ada

PATHS = ("static", "kernels")
MODES = ("eager-fp32", "eager-fp16", "cudagraph-fp16")
FULL = {"models": [("cvig_ti", [1, 64, 512]), ("cvig_s", [256])], "repeats": 10, "warmup": 3,
        "kernel_repeats": 30, "kernel_inner": 20}
QUICK = {"models": [("cvig_ti", [1, 8]), ("cvig_s", [8])], "repeats": 3, "warmup": 1,
         "kernel_repeats": 5, "kernel_inner": 5}

KERNEL_OPS = [  # (column title, op key in plugins/bench_kernels.py's JSON)
    ("k-means kernel", "kmeans_kernel"), ("k-means PyTorch", "kmeans_torch"),
    ("k-NN kernel", "knn_kernel"), ("masked TopK", "knn_torch_masked_topk"),
    ("segment mean kernel", "segment_mean_kernel"), ("segment mean PyTorch", "segment_mean_torch"),
    ("gather-max-rel kernel", "gather_max_rel_kernel"), ("gather-max PyTorch", "gather_max_rel_torch"),
    ("fc1 + fc2 convs", "grapher_fc1_fc2_convs"),
]


def log(msg: str) -> None:
    print(f"[gpu-acceptance] {msg}", flush=True)


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "gpu"


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------
# Step 1: build
# ----------------------------------------------------------------------------


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for p in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if p and Path(p).is_file():
            return p
    return None


def step_build(arch: str, build_dir: Path) -> Dict:
    cmake = shutil.which("cmake")
    if not cmake:
        raise RuntimeError("cmake is not on PATH")
    nvcc = _nvcc()
    if not nvcc:
        raise RuntimeError("nvcc not found (PATH, $CUDACXX, /usr/local/cuda/bin/nvcc)")
    res: Dict = {"arch": arch, "build_dir": str(build_dir), "nvcc": nvcc}
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    res["nvcc_version"] = (re.findall(r"release [^\n]+", ver.stdout) or [ver.stdout.strip()[-80:]])[0]
    configure = [cmake, "-S", str(ROOT / "plugins"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCVIG_CUDA_ARCHS={arch}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    log("  " + " ".join(configure))
    cfg = subprocess.run(configure, capture_output=True, text=True, timeout=600)
    res["configure_tail"] = _tail(cfg.stdout + cfg.stderr, 1500)
    if cfg.returncode != 0:
        raise RuntimeError(f"CMake configure failed (exit {cfg.returncode}):\n{_tail(cfg.stdout + cfg.stderr, 1500)}")
    build = [cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]
    log("  " + " ".join(build))
    t0 = time.perf_counter()
    bld = subprocess.run(build, capture_output=True, text=True, timeout=1800)
    res["build_tail"] = _tail(bld.stdout + bld.stderr, 1500)
    res["compile_s"] = round(time.perf_counter() - t0, 1)
    if bld.returncode != 0:
        raise RuntimeError(f"build failed (exit {bld.returncode}):\n{_tail(bld.stdout + bld.stderr, 2000)}")
    cuda_lib, host_lib = build_dir / "libcvig_kernels.so", build_dir / "libcvig_kernels_host.so"
    if not host_lib.is_file():
        raise RuntimeError(f"{host_lib} was not built")
    if not cuda_lib.is_file():
        raise RuntimeError(f"{cuda_lib} was not built: CMake did not enable CUDA (see configure_tail)")
    res["cuda_library"], res["host_library"] = str(cuda_lib), str(host_lib)
    return res


def use_libraries(build_dir: Path) -> Dict[str, str]:
    """Point CVIG_KERNELS_LIB / CVIG_KERNELS_HOST_LIB at this build's libraries (inherited by subprocesses)."""
    from clustervig.plugins.kernels import ENV, ENV_HOST

    chosen = {}
    for env, name in ((ENV, "libcvig_kernels.so"), (ENV_HOST, "libcvig_kernels_host.so")):
        lib = build_dir / name
        if lib.is_file():
            os.environ[env] = str(lib)
            chosen[env] = str(lib)
    return chosen


# ----------------------------------------------------------------------------
# Step 2: GPU tests
# ----------------------------------------------------------------------------


def gpu_test_files(tests_dir: Path = ROOT / "tests") -> List[Path]:
    """Test files with gpu-marked tests. Passing only these to pytest keeps files that import packages a
    bare GPU machine lacks (click, polygraphy, ...) out of the collection."""
    return sorted(p for p in tests_dir.glob("test_*.py") if _GPU_MARK.search(p.read_text(errors="replace")))


# a gpu mark applied in code (module pytestmark, decorator, pytest.param marks), not one named in a string
_GPU_MARK = re.compile(r"^\s*pytestmark\s*=[^\n]*mark\.gpu\b|^\s*pytestmark\s*=\s*\[[^\]]*mark\.gpu\b"
                       r"|^\s*@pytest\.mark\.gpu\b|^\s*marks\s*=[^\n]*mark\.gpu\b", re.M)


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)\b")


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


def step_tests(timeout: int) -> Dict:
    files = gpu_test_files()
    if not files:
        raise RuntimeError("no test file with gpu-marked tests under tests/")
    # --continue-on-collection-errors: a file that imports a package this machine lacks is
    # reported as an error without stopping the other files' tests
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *(str(f.relative_to(ROOT)) for f in files)]
    log("  " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    out = proc.stdout + proc.stderr
    counts = parse_pytest_counts(proc.stdout)
    res = {"command": " ".join(cmd[1:]), "files": [str(f.relative_to(ROOT)) for f in files],
           "libraries": {k: os.environ.get(k) for k in ("CVIG_KERNELS_LIB", "CVIG_KERNELS_HOST_LIB")},
           "returncode": proc.returncode, "counts": counts, "pytest_s": round(time.perf_counter() - t0, 1),
           "output_tail": _tail(out)}
    for line in _tail(proc.stdout, 1500).splitlines()[-6:]:
        log("  | " + line)
    if proc.returncode != 0:
        res["status"] = "failed"
        res["error"] = f"pytest exited with {proc.returncode}: {counts or 'no summary line'}"
    elif not counts.get("passed"):
        res["status"] = "failed"  # everything skipped is no acceptance: the library or CUDA was not found
        res["error"] = f"no test passed: {counts}"
    return res


# ----------------------------------------------------------------------------
# Step 3: kernel benchmark
# ----------------------------------------------------------------------------


def step_kernels(out_dir: Path, slug: str, repeats: int, inner: int, timeout: int) -> Dict:
    path = out_dir / f"kernels_{slug}.json"
    cmd = [sys.executable, str(ROOT / "plugins" / "bench_kernels.py"), "--out", str(path), "--repeats", str(repeats),
           "--inner", str(inner)]
    log("  " + " ".join(cmd))
    if path.exists():
        path.unlink()  # never report a previous run's numbers as this one's
    # a subprocess: a kernel fault that poisons the CUDA context must not take step 4 with it
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if "goal:" in line:
            log("  " + line)
    res: Dict = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "json": str(path),
                 "output_tail": _tail(proc.stdout + proc.stderr)}
    if path.is_file():  # written even when some case failed: the others' numbers still count
        res["data"] = json.loads(path.read_text())
    if proc.returncode != 0 or not path.is_file():
        res["status"] = "failed"
        res["error"] = f"bench_kernels.py exited with {proc.returncode}: {_tail(proc.stderr.strip(), 600)}"
    return res


# ----------------------------------------------------------------------------
# Step 4: whole model
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
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except (ImportError, ValueError):  # a broken or half-installed package counts as absent
        return False


def sample_images(cfg) -> Tuple[object, str]:
    if _have("skimage", "PIL"):
        from clustervig.preprocess import sample_photographs, transform_spec

        return sample_photographs(transform_spec(cfg)), "the 4 scikit-image sample photographs, tiled"
    return synthetic_images(8, cfg.img_size), "8 synthetic images, tiled (scikit-image/Pillow not installed)"


def _describe(exc: BaseException) -> Dict:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"oom": True}
    return {"error": _first_line(exc)}


def time_cells(cells: Dict[str, Callable[[], object]], repeats: int, warmup: int):
    """CUDA-event time of each cell, interleaved rounds (A B C A B C ...) so drift hits all alike.

    Returns ({cell: [seconds]}, {cell: failure}); a cell that fails is dropped and the rest go on.
    """
    import torch

    cells = dict(cells)
    failed: Dict[str, Dict] = {}

    def drop(key, exc):
        failed[key] = _describe(exc)
        cells.pop(key, None)
        gc.collect()
        torch.cuda.empty_cache()

    for _ in range(warmup):
        for key, fn in list(cells.items()):
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - per cell
                drop(key, exc)
    times: Dict[str, List[float]] = {key: [] for key in cells}
    for _ in range(repeats):
        for key, fn in list(cells.items()):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                a.record()
                fn()
                b.record()
                b.synchronize()
            except Exception as exc:  # noqa: BLE001 - per cell
                drop(key, exc)
                times.pop(key, None)
                continue
            times[key].append(a.elapsed_time(b) / 1e3)
    return times, failed


def _infer(model, x):
    import torch

    with torch.inference_mode():
        return model(x)


def step_models(plan: Dict, device: str = "cuda") -> Dict:
    import copy

    import torch

    import clustervig
    from clustervig.utils import calibrate_batchnorm

    dev = torch.device(device)
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as timing harnesses do: cuDNN picks its fastest algorithms in warm-up
    rows: List[Dict] = []
    res: Dict = {"repeats": plan["repeats"], "warmup": plan["warmup"], "rows": rows,
                 "settings": {"cudnn_benchmark": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                              "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}}
    try:
        for name, batches in plan["models"]:
            log(f"  {name}: random weights, BatchNorm calibrated on the sample images")
            try:
                torch.manual_seed(0)
                base = clustervig.create_model(name)
                images, res["inputs"] = sample_images(base.cfg)
                base = base.to(dev)
                calibrate_batchnorm(base, [images.to(dev)])
                variants = {}
                for path in PATHS:
                    m32 = copy.deepcopy(base).eval()
                    if path == "kernels":
                        m32.set_kernels(True)
                    variants[path] = (m32, copy.deepcopy(m32).half())
            except Exception as exc:  # noqa: BLE001 - this model's rows say why; the next model still runs
                err = _describe(exc)
                log(f"  {name}: could not be set up: {err}")
                rows += [{"model": name, "batch": b, "path": p, "mode": m, **err}
                         for b in batches for p in PATHS for m in MODES]
                gc.collect()
                torch.cuda.empty_cache()
                continue
            for b in batches:
                try:
                    x32 = images.repeat(-(-b // len(images)), 1, 1, 1)[:b].contiguous().to(dev)
                    x16 = x32.half()
                except Exception as exc:  # noqa: BLE001 - e.g. the batch's input alone does not fit
                    rows += [{"model": name, "batch": b, "path": p, "mode": m, **_describe(exc)}
                             for p in PATHS for m in MODES]
                    continue
                cells: Dict[str, Callable[[], object]] = {}
                failed: Dict[str, Dict] = {}
                for path, (m32, m16) in variants.items():
                    for mode in MODES:
                        key = f"{path}/{mode}"
                        try:
                            if mode == "eager-fp32":
                                cells[key] = lambda m=m32, x=x32: _infer(m, x)
                            elif mode == "eager-fp16":
                                cells[key] = lambda m=m16, x=x16: _infer(m, x)
                            else:
                                cells[key] = common.cuda_graphed(m16, x16)
                        except Exception as exc:  # noqa: BLE001 - per cell (OOM, capture refused, ...)
                            failed[key] = _describe(exc)
                            if "error" in failed[key] and mode.startswith("cudagraph"):
                                failed[key]["error"] = "CUDA-graph capture failed: " + failed[key]["error"]
                            gc.collect()
                            torch.cuda.empty_cache()
                times, late = time_cells(cells, plan["repeats"], plan["warmup"])
                failed.update(late)
                for path in PATHS:
                    for mode in MODES:
                        key = f"{path}/{mode}"
                        row = {"model": name, "batch": b, "path": path, "mode": mode}
                        if key in times and times[key]:
                            ts = times[key]
                            med = statistics.median(ts)
                            row.update(median_s=med, min_s=min(ts), max_s=max(ts), throughput_img_s=b / med)
                            log(f"  {name:<8} b={b:<4} {path:<8} {mode:<15} {med * 1e3:9.2f} ms {b / med:10.1f} img/s")
                        else:
                            row.update(failed.get(key, {"error": "not timed"}))
                            log(f"  {name:<8} b={b:<4} {path:<8} {mode:<15} {'OOM' if row.get('oom') else row.get('error')}")
                        rows.append(row)
                del cells, times, x32, x16
                gc.collect()
                torch.cuda.empty_cache()
            del variants, base
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = saved
    if rows and not any("throughput_img_s" in r for r in rows):
        res["status"] = "failed"
        res["error"] = "no cell could be timed"
    return res


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
    if not st:
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
    if row.get("oom"):
        return "OOM"
    msg = row.get("error", "failed")
    if msg not in notes:
        notes.append(msg)
    return f"error [{notes.index(msg) + 1}]"


def render_markdown(results: Dict) -> str:
    dev = results.get("device", {})
    ver = results.get("versions", {})
    steps = results.get("steps", {})
    goals = results.get("goals") or evaluate_goals(results)
    lines = [
        f"## GPU acceptance: {dev.get('name', 'unknown GPU')}",
        "",
        f"`{results.get('command', 'python -m bench.gpu_acceptance')}` — {results.get('date', '')}; "
        f"torch {ver.get('torch', '?')}, CUDA {ver.get('cuda', '?')}, compute capability {dev.get('capability', '?')}, "
        f"{dev.get('sms', '?')} SMs, {dev.get('memory_gib', '?')} GiB"
        + (" — **quick run** (small batches, few repeats)" if results.get("quick") else "")
        + f". Raw results: `gpu_acceptance_{device_slug(dev.get('name', 'gpu'))}.json`.",
        "",
        "### Goals",
        "",
        "| goal | target | measured | verdict |",
        "|---|---|---|---|",
    ]
    for g in goals:
        lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {_verdict(g['met'])} |")
    lines += ["", "### Steps", "", "| step | status | seconds | detail |", "|---|---|---:|---|"]
    for name in ("build", "tests", "kernels", "models"):
        s = steps.get(name)
        if s is None:
            continue
        if s.get("status") == "failed":
            detail = (s.get("error") or "").splitlines()[0][:200] if s.get("error") else ""
        elif name == "build" and s.get("status") == "ok":
            detail = f"sm_{s.get('arch')}, {s.get('nvcc_version', 'nvcc')}"
        elif name == "tests" and s.get("counts"):
            detail = ", ".join(f"{v} {k}" for k, v in s["counts"].items())
        elif name == "kernels" and s.get("json"):
            detail = f"`{Path(s['json']).name}`"
        elif name == "models" and s.get("inputs"):
            detail = f"inputs: {s['inputs']}; median of {s.get('repeats')} rounds after {s.get('warmup')} warm-up"
        else:
            detail = s.get("note", "")
        secs = f"{s['seconds']:.0f}" if isinstance(s.get("seconds"), (int, float)) else ""
        lines.append(f"| {name} | {s.get('status', '?')} | {secs} | {detail.replace('|', '/')} |")
    cases = _kernel_cases(results)
    if cases:
        kd = steps["kernels"]["data"]
        lines += ["", "### Plugin kernels vs the PyTorch ops they replace (GPU µs per call)", "",
                  f"`plugins/bench_kernels.py`: {kd.get('inner', '?')} calls captured in one CUDA graph, median of "
                  f"{kd.get('repeats', '?')} replays (launch overhead excluded; '(eager)': the graph could not be "
                  "captured, plain launches timed).", "",
                  "| case | B | N | C | kappa | K | dtype | " + " | ".join(t for t, _ in KERNEL_OPS) + " |",
                  "|---|---:|---:|---:|---:|---:|---|" + "---:|" * len(KERNEL_OPS)]
        for c in cases:
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
            lines.append(f"| {c['name']} | {sh['batch']} | {sh['tokens']} | {sh['dim']} | {sh['clusters']} | {sh['k']} "
                         f"| {c['dtype'].upper()} | " + " | ".join(cells) + " |")
    rows = (steps.get("models") or {}).get("rows") or []
    if rows:
        notes: List[str] = []
        by = {(r["model"], r["batch"], r["path"], r["mode"]): r for r in rows}
        lines += ["", "### Whole model, PyTorch CUDA (images per second)", "",
                  "Random weights (BatchNorm calibrated on the inputs); static: the pure static form (PyTorch ops), "
                  "kernels: `set_kernels(True)` (k-means, k-NN, centroid means and gather-max on the plugin kernels); "
                  "eager: one forward per call, cudagraph: the forward captured once and replayed; CUDA-event time "
                  f"per call, median of {steps['models'].get('repeats', '?')} interleaved rounds. "
                  + _settings(steps["models"].get("settings")),
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
    return "\n".join(lines)


def render_json(results: Dict) -> str:
    """The results as written to gpu_acceptance_<device>.json, with the goal verdicts included."""
    return json.dumps({**results, "goals": evaluate_goals(results)}, indent=2, default=str) + "\n"


def write_report(results: Dict, out_dir: Path, md_path: Path) -> Dict:
    """gpu_acceptance_<device>.json in out_dir and this GPU's section of md_path (other sections kept)."""
    slug = device_slug(results["device"]["name"])
    results["goals"] = evaluate_goals(results)
    saved = common.RESULTS, common.BENCHMARKS_MD
    common.configure(out_dir, md_path)
    try:
        path = common.write_json(f"gpu_acceptance_{slug}", json.loads(render_json(results)))
        common.update_section(f"gpu-acceptance-{slug}", render_markdown(results))
    finally:
        common.configure(*saved)
    return {"json": str(path), "markdown": str(md_path)}


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------


def run_step(results: Dict, name: str, index: int, fn: Callable[[], Dict]) -> Dict:
    log(f"step {index}/5 {name} ...")
    t0 = time.perf_counter()
    try:
        res = fn() or {}
        res.setdefault("status", "ok")
    except Exception as exc:  # noqa: BLE001 - one step's failure is recorded, the others still run
        res = {"status": "failed", "error": _first_line(exc) + ("\n" + str(exc) if "\n" in str(exc) else ""),
               "traceback": _tail(traceback.format_exc(), 3000)}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    results["steps"][name] = res
    detail = f": {res['error'].splitlines()[0]}" if res.get("error") else ""
    log(f"step {index}/5 {name}: {res['status']} in {res['seconds']:.0f}s{detail}")
    return res


def build_parser() -> argparse.ArgumentParser:
    ap = common.parser("python -m bench.gpu_acceptance", __doc__)
    ap.add_argument("--quick", action="store_true", help="small batches and few repeats (smoke run)")
    ap.add_argument("--skip-build", action="store_true", help="use the libraries already in build/gpu-acceptance/")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    ap.add_argument("--out", type=Path, help="directory for the JSON results and a BENCHMARKS.md with this section")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        print(f"no CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, {built}); "
              "run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        import clustervig.plugins.kernels  # noqa: F401 - the installed package, with clustervig.plugins
    except ImportError as exc:
        print(f"cannot import clustervig.plugins ({exc}): run `pip install --no-deps --no-build-isolation -e .` "
              "in the repository first", file=sys.stderr)
        return 1
    plan = QUICK if args.quick else FULL
    out_dir = args.out or (QUICK_OUT if args.quick else common.RESULTS)
    md_path = (out_dir / "BENCHMARKS.md") if (args.out or args.quick) else common.BENCHMARKS_MD
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    cap = torch.cuda.get_device_capability(0)
    slug = device_slug(props.name)
    results: Dict = {
        "command": "python -m bench.gpu_acceptance" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))),
        "quick": bool(args.quick),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": props.name, "capability": f"{cap[0]}.{cap[1]}", "sms": props.multi_processor_count,
                   "memory_gib": round(props.total_memory / 2**30, 1)},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "python": platform.python_version()},
        "machine": common.machine(),
        "plan": {"models": plan["models"], "repeats": plan["repeats"], "warmup": plan["warmup"]},
        "steps": {},
    }
    log(f"{props.name} (sm_{cap[0]}{cap[1]}, {props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; results to {out_dir}")
    arch = f"{cap[0]}{cap[1]}"
    if args.skip_build:
        chosen = use_libraries(BUILD_DIR)
        results["steps"]["build"] = {"status": "skipped", "seconds": 0.0, "libraries": chosen,
                                     "note": "--skip-build: " + (", ".join(chosen.values()) if chosen else
                                                                 "no library in build/gpu-acceptance/, "
                                                                 "the default search applies")}
        log(f"step 1/5 build: skipped ({results['steps']['build']['note']})")
    else:
        b = run_step(results, "build", 1, lambda: step_build(arch, BUILD_DIR))
        if b["status"] == "ok":
            b["libraries"] = use_libraries(BUILD_DIR)
    if args.skip_tests:
        results["steps"]["tests"] = {"status": "skipped", "seconds": 0.0, "note": "--skip-tests"}
        log("step 2/5 tests: skipped (--skip-tests)")
    else:
        run_step(results, "tests", 2, lambda: step_tests(timeout=1800))
    run_step(results, "kernels", 3, lambda: step_kernels(out_dir, slug, plan["kernel_repeats"], plan["kernel_inner"],
                                                           timeout=1200))
    run_step(results, "models", 4, lambda: step_models(plan))

    rep = run_step(results, "report", 5, lambda: write_report(results, out_dir, md_path))
    for g in results.get("goals", []):
        log(f"goal: {g['goal']}: {_verdict(g['met']).strip('*')} (target {g['target']}, measured {g['measured']})")
    if rep["status"] == "ok":
        log(f"wrote {rep['json']} and the 'GPU acceptance: {props.name}' section of {rep['markdown']}")
    failed = [n for n, s in results["steps"].items() if s.get("status") == "failed"]
    log("all steps passed" if not failed else f"failed steps: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
