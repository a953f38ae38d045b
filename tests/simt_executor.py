"""Builds and loads the SIMT test executor: the kernels' CUDA device code compiled for the CPU.

``libcvig_kernels_simt.so`` holds the same C ABI as the host and CUDA libraries, built from the
``.cu`` sources and ``cvig_cuda.cuh`` (the device path, not the serial host executor) with the host
compiler and ``plugins/tests/simt/``: CUDA's built-ins as a fiber scheduler with CUDA's barrier and
warp-collective semantics, shared-memory bounds, initialisation and race checks, and a choice of
thread schedule (``plugins/tests/simt/simt_runtime.cpp`` says how). Used by tests only.

Two textual changes make a ``.cu`` file C++: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``cvig_simt::kernel_launch(kernel, grid, block, smem, stream)(args)``, and ``extern __shared__ T
name[];`` a pointer to the launch's dynamic shared memory. Nothing else is touched; a construct the
rewrite does not know (a triple-chevron it cannot parse) fails the build instead of compiling wrongly.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from clustervig.plugins import kernels as K
from clustervig.plugins.hostbuild import build_once

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
SIMT = PLUGINS / "tests" / "simt"
CU_SOURCES = ("kmeans/kmeans_kernel.cu", "knn/knn_kernel.cu", "segment/segment_kernels.cu")
PLANTED = "tests/simt/planted_kernels.cu"
SCHEDULES = ("ascending", "descending", "random:1", "random:2", "random:3")

# the kernels' flags (plugins/CMakeLists.txt): no FMA contraction, so the bits equal the host build's
COMMON = ("-std=c++17", "-fPIC", "-g", "-ffp-contract=off", "-pthread")
DEVICE = ("-x", "c++", "-O2", "-D__CUDACC__", "-D__CUDA_ARCH__=900", '-DCVIG_BACKEND_NAME="simt"',
          "-Wno-unknown-pragmas")
# every load and store of the device code calls the runtime's __asan_*_noabort hooks (no sanitizer runtime)
GCC_HOOKS = ("-fsanitize=kernel-address", "-fsanitize-recover=kernel-address",
             "--param", "asan-instrumentation-with-call-threshold=0", "--param", "asan-globals=0",
             "--param", "asan-stack=0")
CLANG_HOOKS = ("-fsanitize=kernel-address", "-fsanitize-recover=kernel-address",
               "-mllvm", "-asan-instrumentation-with-call-threshold=0", "-mllvm", "-asan-globals=0",
               "-mllvm", "-asan-stack=0")

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")


class SimtBuildError(RuntimeError):
    pass


def rewrite_cu(text: str, name: str = "<source>") -> str:
    """The two rewrites that make a .cu file compile as C++ against plugins/tests/simt/."""
    text = _LAUNCH.sub(lambda m: f"::cvig_simt::kernel_launch({m.group(1)}, {m.group(2).strip()})(", text)
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = static_cast<{m.group(1)}*>(::cvig_simt::dynamic_shared());", text)
    for left in ("<<<", "extern __shared__"):
        if left in text:
            raise SimtBuildError(f"{name}: a '{left}' the SIMT rewrite does not understand is left")
    return text


def _compiler() -> str:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    raise SimtBuildError("no C++ compiler (g++ or clang++) to build the SIMT executor")


def _is_clang(cxx: str) -> bool:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    return "clang" in out.lower()


def _sources(extra: Sequence[str]) -> List[Path]:
    files = sorted((PLUGINS / "common").glob("*.h")) + sorted((PLUGINS / "common").glob("*.cuh"))
    for d in ("kmeans", "knn", "segment"):
        files += sorted((PLUGINS / d).glob("*_impl.h"))
    files += [PLUGINS / s for s in CU_SOURCES] + sorted(SIMT.glob("*.h")) + [SIMT / "simt_runtime.cpp"]
    files += [PLUGINS / e for e in extra]
    return files


def digest(extra: Sequence[str] = (), defines: Sequence[str] = ()) -> str:
    h = hashlib.sha256(" ".join(COMMON + DEVICE + GCC_HOOKS + tuple(defines)).encode())
    for f in _sources(extra):
        h.update(str(f.relative_to(PLUGINS)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: List[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SimtBuildError(f"SIMT build failed:\n{' '.join(cmd)}\n{res.stdout[-3000:]}{res.stderr[-6000:]}")


def build(name: str, cu_files: Iterable[str], defines: Sequence[str] = (), dest: Optional[Path] = None) -> Path:
    """Compile the given .cu files (paths under plugins/) with the runtime into lib<name>-<digest>.so (cached)."""
    cu_files = list(cu_files)
    extra = [f for f in cu_files if f not in CU_SOURCES]
    dest = Path(dest or os.environ.get("CVIG_SIMT_CACHE") or ROOT / "build" / "kernels-simt")
    lib = dest / f"lib{name}-{digest(extra, defines)}.so"

    def make(tree: Path, out: Path) -> None:
        cxx = _compiler()
        hooks = CLANG_HOOKS if _is_clang(cxx) else GCC_HOOKS
        # the kernels keep their relative includes ("../common/cvig_cuda.cuh"): copy the tree they see
        for d in ("common", "kmeans", "knn", "segment", "tests/simt"):
            shutil.copytree(PLUGINS / d, tree / d, dirs_exist_ok=True)
        jobs = []
        for i, cu in enumerate(cu_files):
            src = tree / cu
            # beside the original, so its relative includes resolve; #line keeps reports naming the real file
            rewritten = src.parent / (src.stem + "_simt.cpp")
            rewritten.write_text(f'#line 1 "{PLUGINS / cu}"\n' + rewrite_cu(src.read_text(), cu))
            jobs.append([cxx, *COMMON, *DEVICE, *hooks, *defines, f"-I{tree / 'tests' / 'simt'}", "-c", str(rewritten),
                         "-o", str(tree / f"k{i}.o")])
        jobs.append([cxx, *COMMON, "-O2", *defines, f"-I{tree / 'tests' / 'simt'}", "-c",
                     str(tree / "tests" / "simt" / "simt_runtime.cpp"), "-o", str(tree / "runtime.o")])
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(_run, jobs))
        objs = [str(tree / f"k{i}.o") for i in range(len(cu_files))] + [str(tree / "runtime.o")]
        _run([cxx, "-shared", "-pthread", "-Wl,-z,defs", "-o", str(out), *objs, "-ldl"])

    return build_once(lib, make)


def build_kernels(defines: Sequence[str] = ()) -> Path:
    """libcvig_kernels_simt: the kernel library's C ABI, device code on the SIMT executor."""
    return build("cvig_kernels_simt", CU_SOURCES, defines)


def build_planted() -> Path:
    """The planted-defect kernels of the executor's own tests (and the k-NN insertion before its fix)."""
    return build("cvig_simt_planted", [PLANTED])


class Executor:
    """The SIMT runtime's test interface in a loaded library (its schedule, device properties, reports)."""

    def __init__(self, cdll: ctypes.CDLL) -> None:
        self.cdll = cdll
        cdll.cvig_simt_configure.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        cdll.cvig_simt_report.restype = ctypes.c_char_p
        cdll.cvig_simt_context_switch.restype = ctypes.c_char_p
        cdll.cvig_simt_stats.argtypes = [ctypes.POINTER(ctypes.c_longlong)]

    def configure(self, schedule: str = "ascending", sms: int = 132, smem_optin: int = 227 * 1024,
                  races: bool = True, fill: int = 0xA5) -> None:
        if self.cdll.cvig_simt_configure(schedule.encode(), sms, smem_optin, int(races), fill) != 0:
            raise ValueError(f"bad SIMT configuration: schedule {schedule!r}, sms {sms}, smem {smem_optin}, fill {fill}")

    def reset_attributes(self) -> None:
        self.cdll.cvig_simt_reset_attributes()

    def report(self) -> str:
        return self.cdll.cvig_simt_report().decode()

    def clear(self) -> None:
        self.cdll.cvig_simt_clear()

    def stats(self) -> dict:
        out = (ctypes.c_longlong * 6)()
        self.cdll.cvig_simt_stats(out)
        return dict(zip(("launches", "blocks", "threads", "switches", "collectives", "barriers"), out))

    def context_switch(self) -> str:
        return self.cdll.cvig_simt_context_switch().decode()


class SimtDefect(AssertionError):
    """The executor reported a defect (divergence, deadlock, race, bad shared-memory access)."""


class SimtLibrary(K.KernelLibrary):
    """The kernel library on the SIMT executor; every call fails with the executor's report if it has one."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "simt")
        self.executor = Executor(self.lib)

    def call(self, what: str, name: str, *args) -> None:
        self.executor.clear()
        code = getattr(self.lib, name)(*args)
        report = self.executor.report()
        if report:
            raise SimtDefect(f"{what}: {report}")
        if code != 0:
            super().call(what, name, *args)  # the usual error for the status (runs the launcher again)


def _es(dtype: int) -> int:
    return 4 if dtype == K.FP32 else 2


# Output buffers of each launcher of plugins/common/cvig_kernels.h: (argument index, bytes) from its arguments.
OUTPUTS = {
    "cvig_kmeans_launch": lambda a: [(7, a[2] * a[3] * 4), (8, a[2] * a[5] * 4)],
    "cvig_kmeans_centroids_launch": lambda a: [(8, a[2] * a[3] * 4), (9, a[2] * a[5] * 4),
                                               (10, a[2] * a[5] * a[4] * _es(a[1]))],
    "cvig_partitioned_knn_launch": lambda a: [(7, a[3] * a[4] * a[6] * 4), (8, a[3] * a[4] * a[6] * 4)],
    "cvig_segment_mean_launch": lambda a: [(7, a[3] * a[6] * a[5] * _es(a[2])), (8, a[3] * a[6] * 4)],
    "cvig_gather_max_rel_launch": lambda a: [(7, a[3] * a[4] * a[5] * _es(a[2]))],
}


class TwinLibrary(SimtLibrary):
    """The SIMT library, with every launch also run on the host library: the status must be the same and
    every output byte identical, or the call fails naming the launcher, the output and the first
    differing element. ``compared`` counts the launches checked."""

    def __init__(self, path: Path, host: K.KernelLibrary) -> None:
        super().__init__(path)
        self.host = host
        self.compared = 0

    def call(self, what: str, name: str, *args) -> None:
        outs = OUTPUTS[name](args)
        host_args, bufs = list(args), []
        for i, n in outs:
            buf = ctypes.create_string_buffer(max(n, 1))
            host_args[i] = ctypes.addressof(buf)
            bufs.append(buf)
        host_code = getattr(self.host.lib, name)(*host_args)
        self.executor.clear()
        code = getattr(self.lib, name)(*args)
        report = self.executor.report()
        if report:
            raise SimtDefect(f"{what}: {report}")
        if code != host_code:
            raise AssertionError(f"{what}: {name} returned {code} on the SIMT executor, {host_code} on the host")
        if code == 0:
            for (i, n), buf in zip(outs, bufs):
                got = ctypes.string_at(args[i], n)
                if got != buf.raw[:n]:
                    first = next(j for j in range(n) if got[j] != buf.raw[j])
                    raise AssertionError(f"{what}: output argument {i} of {name} differs from the host build's "
                                         f"at byte {first} of {n}")
            self.compared += 1
        else:
            K.KernelLibrary.call(self.host, what, name, *host_args)  # raises the usual error for the status


def resolve_report(report: str, lib: Path) -> str:
    """The report with its [lib+0xOFFSET] code addresses turned into file:line where addr2line exists."""
    tool = shutil.which("addr2line")
    if not tool:
        return report

    def one(m: re.Match) -> str:
        res = subprocess.run([tool, "-C", "-f", "-i", "-e", str(lib), m.group(2)], capture_output=True, text=True)
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        locs = [f"{lines[i]} ({Path(lines[i + 1]).name})" for i in range(0, len(lines) - 1, 2)]
        return m.group(0) + (" = " + " <- ".join(locs) if locs else "")

    return re.sub(r"\[([^\]+]+)\+(0x[0-9a-f]+)\]", one, report)
