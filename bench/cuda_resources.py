"""The CUDA kernels' resources per architecture: registers, spills, stack and shared memory, from ptxas.

    python -m bench.cuda_resources [--build DIR] [--log FILE] [--results DIR --markdown FILE] [--no-docs]

Builds plugins/ with CMake for every default architecture (as CI does), with
``-Xptxas=-v`` so that ptxas reports each kernel's resources, and turns that
report into one record per kernel and architecture (:func:`parse`). Then it
checks them against the launch configurations the launchers use and each
architecture's limits (:func:`check`):

* no local-memory spills in the k-means and k-NN kernels (or an entry of
  :data:`ACCEPTED_SPILLS` with its reason, documented in docs/design.md);
* each kernel's largest launch fits: threads x registers, allocated per warp
  as the hardware does, within the block's and the SM's register file;
* static + dynamic shared memory within the block limit (the opt-in maximum
  for the k-means kernel, which opts in; 48 KiB for the others), for the k-NN
  kernel at K = CVIG_MAX_K and for the k-means kernel at every registered
  model variant's DEGC shape (a larger working set is refused at run time with
  CVIG_UNSUPPORTED_SIZE: documented, but no published variant may need it).

``--log FILE`` parses a saved build log instead of building. Writes
bench/results/cuda_resources.json, the "cuda-resources" section of BENCHMARKS.md
and the generated table in docs/design.md ("Kernel resources per architecture").
tests/test_plugins_build.py runs the same build, parse and check in CI.
"""
from __future__ import annotations

import datetime as _dt
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import common

PLUGINS = common.ROOT / "plugins"
DESIGN_MD = common.ROOT / "docs" / "design.md"
SECTION = "cuda-resources"  # BENCHMARKS.md and docs/design.md markers: <!-- bench:cuda-resources -->

KERNELS = ("kmeans_kernel", "knn_kernel", "segment_mean_kernel", "gather_max_rel_kernel")
DTYPES = ("float", "f16")  # every kernel is instantiated for T = float and T = cvig::f16
NO_SPILL = ("kmeans_kernel", "knn_kernel")  # their inner loops run per iteration and per candidate
# (kernel, arch) -> why a spill there is accepted (and where docs/design.md says so). Empty: none is.
ACCEPTED_SPILLS: Dict[Tuple[str, str], str] = {}

CVIG_MAX_K = 64  # plugins/common/cvig_kernels.h
DEFAULT_SMEM = 48 * 1024  # a block gets more dynamic shared memory only after cudaFuncSetAttribute (opt-in)


# ---------------------------------------------------------------------------------------------------------
# Limits per architecture.
#
# NVIDIA CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per Compute
# Capability" (docs.nvidia.com/cuda/cuda-programming-guide/05-appendices/compute-capabilities.html):
# 64 K 32-bit registers per SM and at most 64 K per thread block, at most 255 registers per thread,
# at most 1024 threads per block, for every compute capability 7.5 ... 12.x; "maximum amount of shared
# memory per thread block" (opt-in) = the SM's largest shared-memory carve-out less the 1 KB the driver
# reserves per block (from 8.0 on).
# The same numbers as the CUDA toolkit's occupancy calculator, include/cuda_occupancy.h (CUDA 13.0):
# cudaOccRegAllocationGranularity = 256 registers, allocated per warp; cudaOccSubPartitionsPerMultiprocessor
# = 4 (the hardware's per-block check rounds the warps up to a multiple of 4); the carve-outs of
# cudaOccAlignUpShmemSizeVoltaPlus: 7.5 at most 64 KB (no reserve before 8.0), 8.0 and 8.7 164 KB,
# 8.6 and 8.9 100 KB, 9.0 228 KB, 10.0/10.1/10.3 and 11.0 228 KB, 12.0/12.1 100 KB.
# export/trt_compat.py SMEM_OPTIN_LIMITS (from CUTLASS) agrees where it has an entry (tested).
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchLimits:
    smem_per_sm: int  # largest shared-memory carve-out of one SM, bytes
    smem_optin: int  # largest shared memory (static + dynamic) of one block after opting in, bytes
    regs_per_sm: int = 64 * 1024
    regs_per_block: int = 64 * 1024
    max_regs_per_thread: int = 255
    max_threads_per_block: int = 1024
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    warp: int = 32
    sub_partitions: int = 4


KIB = 1024
LIMITS: Dict[str, ArchLimits] = {
    "sm_75": ArchLimits(64 * KIB, 64 * KIB),
    "sm_80": ArchLimits(164 * KIB, 163 * KIB),
    "sm_86": ArchLimits(100 * KIB, 99 * KIB),
    "sm_87": ArchLimits(164 * KIB, 163 * KIB),  # Jetson Orin
    "sm_89": ArchLimits(100 * KIB, 99 * KIB),
    "sm_90": ArchLimits(228 * KIB, 227 * KIB),
    "sm_100": ArchLimits(228 * KIB, 227 * KIB),
    "sm_103": ArchLimits(228 * KIB, 227 * KIB),
    "sm_110": ArchLimits(228 * KIB, 227 * KIB),  # Jetson Thor (sm_101 before CUDA 13)
    "sm_120": ArchLimits(100 * KIB, 99 * KIB),
    "sm_121": ArchLimits(100 * KIB, 99 * KIB),
}


# ---------------------------------------------------------------------------------------------------------
# Launch configurations, as the launchers in plugins/*/*.cu use them.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    threads: int  # the largest block the launcher uses
    opt_in: bool  # the launcher raises cudaFuncAttributeMaxDynamicSharedMemorySize when it needs more than 48 KiB
    note: str


LAUNCHES: Dict[str, Launch] = {
    # kMaxThreads = 1024 threads when B < SM count, else 256; one block per image, its working set in
    # dynamic shared memory (kmeans_smem_bytes), opted in above 48 KiB; __launch_bounds__(1024)
    "kmeans_kernel": Launch(1024, True, "1024 threads (B < SMs; else 256), dynamic smem = k-means working set"),
    # kWarpsPerBlock = 4 warps, dynamic smem 2 * 4 * K * 4 bytes (K <= CVIG_MAX_K), no opt-in
    "knn_kernel": Launch(128, False, "128 threads (4 warps), dynamic smem 2*4*K*4 B, K <= 64"),
    "segment_mean_kernel": Launch(256, False, "256 threads, no shared memory"),
    "gather_max_rel_kernel": Launch(256, False, "256 threads, no shared memory"),
}


def knn_smem_bytes(k: int = CVIG_MAX_K) -> int:
    """Dynamic shared memory of one k-NN block (plugins/knn/knn_kernel.cu: [4 warps][K] floats + ints)."""
    return 2 * 4 * k * 4


def kmeans_smem_bytes(n: int, c: int, clusters: int) -> int:
    """The k-means working set of one image (plugins/common/cvig_args.h kmeans_smem_bytes)."""
    return (clusters * c + clusters) * 4 + (2 * clusters + 2 * n) * 4


@dataclass(frozen=True)
class Shape:
    """One DEGC's k-means problem: N tokens of C channels into kappa clusters."""

    name: str
    n: int
    c: int
    clusters: int
    k_max: int  # largest K of the variant's blocks


def model_shapes() -> List[Shape]:
    """The DEGC shape of every registered model variant (clustervig.list_models())."""
    from clustervig.registry import get_config, list_models

    out = []
    for name in list_models():
        cfg = get_config(name)
        out.append(Shape(name, cfg.tokens, cfg.dim, cfg.clusters, max(cfg.neighbors)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Parsing ptxas -v output.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelResources:
    kernel: str  # short name with template arguments, e.g. kmeans_kernel<f16>
    arch: str  # sm_XX
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes of local memory per thread for the stack frame (spills included)
    smem: int  # static shared memory, bytes (dynamic shared memory is a launch parameter)
    local: int  # local memory per thread, bytes: the largest of stack frame, lmem, cumulative stack
    barriers: int
    cmem: int  # bytes of constant bank 0 (kernel parameters), where ptxas reports it
    mangled: str

    @property
    def base(self) -> str:
        return self.kernel.split("<", 1)[0]

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


_ENTRY = re.compile(r"ptxas info\s*:\s*Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"ptxas info\s*:\s*Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*:\s*Used (\d+) registers(.*)$")


def parse(text: str) -> List[KernelResources]:
    """Records of the entry functions in ptxas' verbose output (nvcc -Xptxas=-v or --resource-usage).

    Each kernel reads: "Compiling entry function '<mangled>' for 'sm_XX'", "Function properties for
    <mangled>", "<n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads", "Used <n>
    registers[, used <n> barriers][, <n> bytes cumulative stack size][, <n> bytes smem][, <n> bytes
    cmem[0]][, <n> bytes lmem]". The lines of one compilation must not be interleaved with another's
    (GNU make -O / Ninja keep each command's output together). Identical records (the same object
    built twice) are kept once.
    """
    out: List[KernelResources] = []
    cur: Optional[Dict] = None
    props_for: Optional[str] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "frame": None}
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m:
            if cur is not None and props_for == cur["mangled"]:
                cur["frame"] = tuple(int(v) for v in m.groups())
            props_for = None  # a device function's properties (separate compilation): not an entry's
            continue
        m = _USED.search(line)
        if m and cur is not None:
            out.append(_record(cur, int(m.group(1)), m.group(2)))
            cur = None
    seen = set()
    unique = []
    for r in out:
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def _record(cur: Dict, registers: int, rest: str) -> KernelResources:
    def bytes_of(what: str) -> int:
        m = re.search(r"(\d+) bytes " + re.escape(what), rest)
        return int(m.group(1)) if m else 0

    frame, stores, loads = cur["frame"] or (0, 0, 0)
    barriers = re.search(r"used (\d+) barriers", rest)
    lmem, cumulative = bytes_of("lmem"), bytes_of("cumulative stack size")
    return KernelResources(
        kernel=demangle(cur["mangled"]), arch=cur["arch"], registers=registers, spill_stores=stores,
        spill_loads=loads, stack_frame=frame, smem=bytes_of("smem"), local=max(frame, lmem, cumulative),
        barriers=int(barriers.group(1)) if barriers else 0, cmem=bytes_of("cmem[0]"), mangled=cur["mangled"])


# A small Itanium demangler for kernel names: the last component of the (nested) name with its template
# arguments, namespaces and the anonymous namespace left out (kmeans_kernel<f16> for
# _ZN..._GLOBAL__N_...13kmeans_kernelIN4cvig3f16EEEv...). Anything else: the mangled name itself.
_BUILTIN = {"v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char", "s": "short",
            "t": "unsigned short", "i": "int", "j": "unsigned", "l": "long", "m": "unsigned long",
            "x": "long long", "y": "unsigned long long", "f": "float", "d": "double"}


def demangle(mangled: str) -> str:
    try:
        if mangled.startswith("_ZN"):
            parts, _ = _nested(mangled, 3)
            return parts[-1]
        if mangled.startswith("_Z") and mangled[2:3].isdigit():
            name, i = _source_name(mangled, 2)
            if mangled[i:i + 1] == "I":
                args, _ = _template_args(mangled, i + 1)
                name += "<" + ", ".join(args) + ">"
            return name
    except (ValueError, IndexError):
        pass
    return mangled


def _source_name(s: str, i: int) -> Tuple[str, int]:
    m = re.match(r"\d+", s[i:])
    if not m:
        raise ValueError(s[i:])
    j = i + len(m.group(0))
    return s[j:j + int(m.group(0))], j + int(m.group(0))


def _nested(s: str, i: int) -> Tuple[List[str], int]:
    parts: List[str] = []
    while s[i] != "E":
        if s[i].isdigit():
            name, i = _source_name(s, i)
            if not name.startswith("_GLOBAL__N"):  # the anonymous namespace
                parts.append(name)
        elif s[i] == "I" and parts:
            args, i = _template_args(s, i + 1)
            parts[-1] += "<" + ", ".join(args) + ">"
        else:
            raise ValueError(s[i:])
    if not parts:
        raise ValueError(s)
    return parts, i + 1


def _template_args(s: str, i: int) -> Tuple[List[str], int]:
    args: List[str] = []
    while s[i] != "E":
        if s[i] == "L":  # a literal: L <type> <value> E
            _, j = _type(s, i + 1)
            end = s.index("E", j)
            args.append(s[j:end].replace("n", "-", 1))
            i = end + 1
        else:
            t, i = _type(s, i)
            args.append(t)
    return args, i + 1


def _type(s: str, i: int) -> Tuple[str, int]:
    if s.startswith("DF16_", i):
        return "_Float16", i + 5
    if s[i] in _BUILTIN:
        return _BUILTIN[s[i]], i + 1
    if s[i] == "N":
        parts, i = _nested(s, i + 1)
        return parts[-1], i
    if s[i].isdigit():
        return _source_name(s, i)
    raise ValueError(s[i:])


# ---------------------------------------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------------------------------------
def registers_per_block(registers: int, threads: int, lim: ArchLimits) -> Tuple[int, int]:
    """(allocated, as the hardware checks it): registers of one block of ``threads`` threads, each warp
    given registers x 32 rounded up to the allocation unit; the hardware's check also rounds the warps up
    to a multiple of the SM's sub-partitions (cuda_occupancy.h cudaOccMaxBlocksPerSMRegsLimit)."""
    per_warp = -(-registers * lim.warp // lim.reg_alloc_unit) * lim.reg_alloc_unit
    warps = -(-threads // lim.warp)
    return per_warp * warps, per_warp * (-(-warps // lim.sub_partitions) * lim.sub_partitions)


def smem_limit(kernel: str, arch: str) -> Optional[int]:
    """Largest static + dynamic shared memory one block of ``kernel`` may use on ``arch`` (None: unknown)."""
    lim = LIMITS.get(arch)
    if lim is None:
        return None
    launch = LAUNCHES.get(kernel.split("<", 1)[0])
    return lim.smem_optin if launch is not None and launch.opt_in else min(DEFAULT_SMEM, lim.smem_optin)


def dynamic_smem(base: str, shapes: Sequence[Shape]) -> List[Tuple[str, int]]:
    """(what, bytes) of each dynamic shared-memory size a kernel is launched with."""
    if base == "kmeans_kernel":
        return [(s.name, kmeans_smem_bytes(s.n, s.c, s.clusters)) for s in shapes]
    if base == "knn_kernel":
        return [(f"K={CVIG_MAX_K}", knn_smem_bytes(CVIG_MAX_K))]
    return [("", 0)]


def unaccepted_spills(records: Iterable[KernelResources],
                      accepted: Optional[Dict[Tuple[str, str], str]] = None) -> List[KernelResources]:
    """Records of NO_SPILL kernels that spill, except those in ``accepted`` (default ACCEPTED_SPILLS),
    keyed by (kernel, arch) or (base name, arch)."""
    accepted = ACCEPTED_SPILLS if accepted is None else accepted
    return [r for r in records if r.base in NO_SPILL and r.spills
            and (r.kernel, r.arch) not in accepted and (r.base, r.arch) not in accepted]


def check(records: Iterable[KernelResources], shapes: Optional[Sequence[Shape]] = None,
          accepted: Optional[Dict[Tuple[str, str], str]] = None) -> List[str]:
    """What is wrong with these records: one line per problem (empty: every check passed).

    shapes: the k-means problems to check the k-means kernel's shared memory for (default: every
    registered model variant); accepted: spills allowed with a reason (default ACCEPTED_SPILLS).
    """
    shapes = model_shapes() if shapes is None else shapes
    records = list(records)
    spilled = set(unaccepted_spills(records, accepted))
    problems = []
    for r in records:
        where = f"{r.kernel} on {r.arch}"
        if r in spilled:
            problems.append(f"{where}: spills {r.spill_stores} B stored / {r.spill_loads} B loaded "
                            f"to local memory ({r.registers} registers, {r.stack_frame} B stack frame)")
        lim = LIMITS.get(r.arch)
        launch = LAUNCHES.get(r.base)
        if lim is None or launch is None:
            if lim is None:
                problems.append(f"{where}: no limits known for {r.arch} (add it to LIMITS)")
            continue
        if r.registers > lim.max_regs_per_thread:
            problems.append(f"{where}: {r.registers} registers > {lim.max_regs_per_thread} per thread")
        if launch.threads > lim.max_threads_per_block:
            problems.append(f"{where}: {launch.threads} threads > {lim.max_threads_per_block} per block")
        alloc, hw = registers_per_block(r.registers, launch.threads, lim)
        if max(alloc, hw) > min(lim.regs_per_block, lim.regs_per_sm):
            problems.append(f"{where}: {launch.threads} threads x {r.registers} registers = {max(alloc, hw)} "
                            f"allocated > {min(lim.regs_per_block, lim.regs_per_sm)} per block")
        cap = smem_limit(r.kernel, r.arch)
        for what, dyn in dynamic_smem(r.base, shapes):
            if r.smem + dyn > cap:
                problems.append(f"{where}{' for ' + what if what else ''}: {r.smem} B static + {dyn} B dynamic "
                                f"shared memory > {cap} B per block")
    return problems


def smem_fit(shapes: Sequence[Shape], archs: Sequence[str], static: int = 0) -> List[Dict]:
    """Per shape: the k-means working set and the architectures whose opt-in limit it exceeds."""
    rows = []
    for s in shapes:
        need = kmeans_smem_bytes(s.n, s.c, s.clusters) + static
        rows.append({"name": s.name, "n": s.n, "c": s.c, "clusters": s.clusters, "k_max": s.k_max, "bytes": need,
                     "too_large_for": [a for a in archs if a in LIMITS and need > LIMITS[a].smem_optin]})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Build, report.
# ---------------------------------------------------------------------------------------------------------
def nvcc_version(nvcc: str = "nvcc") -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


def cmake_build(build: Path, jobs: int = 2, source: Path = PLUGINS, extra: Sequence[str] = ()):
    """Configure and build plugins/ in ``build`` with ptxas' resource report on; returns the two
    CompletedProcess objects (configure, build); the build's output holds the report.

    GNU make gets --output-sync=target so that the lines of two parallel nvcc commands do not
    interleave; Ninja keeps each command's output together already."""
    cfg = subprocess.run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                          "-DCMAKE_CUDA_FLAGS=-Xptxas=-v", *extra], capture_output=True, text=True)
    if cfg.returncode != 0:
        return cfg, None
    cache = (Path(build) / "CMakeCache.txt").read_text()
    gen = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache, re.M)
    sync = ["--", "--output-sync=target"] if gen and "Makefiles" in gen.group(1) else []
    # --clean-first: an up-to-date build directory would compile nothing and report nothing
    b = subprocess.run(["cmake", "--build", str(build), f"-j{jobs}", "--clean-first", *sync],
                       capture_output=True, text=True)
    return cfg, b


def archs_of(configure_log: str) -> List[str]:
    """The architectures plugins/CMakeLists.txt chose ("cvig: CUDA architectures 75;80;...")."""
    m = re.search(r"cvig: CUDA architectures (\S+)", configure_log)
    return [f"sm_{a}" for a in m.group(1).split(";")] if m else []


def _kib(b: int) -> str:
    return f"{b / KIB:.1f} KiB" if b % KIB else f"{b // KIB} KiB"


def table(records: Sequence[KernelResources], archs: Optional[Sequence[str]] = None) -> str:
    """Markdown: registers per kernel (rows) and architecture (columns), with any spill, stack frame and
    static shared memory in the cell."""
    archs = list(archs) if archs else sorted({r.arch for r in records}, key=lambda a: int(re.sub(r"\D", "", a)))
    by = {(r.kernel, r.arch): r for r in records}
    kernels = [f"{k}<{d}>" for k in KERNELS for d in DTYPES]
    kernels += sorted({r.kernel for r in records} - set(kernels))
    lines = ["| kernel (largest launch) | " + " | ".join(archs) + " |", "|---|" + "---:|" * len(archs)]
    for k in kernels:
        cells = []
        for a in archs:
            r = by.get((k, a))
            if r is None:
                cells.append("—")
                continue
            extra = []
            if r.spills:
                extra.append(f"spill {r.spill_stores}/{r.spill_loads} B")
            if r.local:
                extra.append(f"stack {r.local} B")
            if r.smem:
                extra.append(f"smem {r.smem} B")
            cells.append(str(r.registers) + (" (" + ", ".join(extra) + ")" if extra else ""))
        launch = LAUNCHES.get(k.split("<", 1)[0])
        lines.append(f"| `{k}` ({launch.threads} threads) | " if launch else f"| `{k}` | ")
        lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def report(res: Dict) -> str:
    """The generated block of BENCHMARKS.md and docs/design.md."""
    records = [KernelResources(**r) for r in res["records"]]
    archs = res["archs"]
    spills = [r for r in records if r.spills]
    smem = [r for r in records if r.smem]
    out = [
        f"Registers per thread that ptxas gave each kernel, {res['nvcc']} (`-O3 -fmad=false`), "
        f"generated by `python -m bench.cuda_resources` ({res['date']}). "
        + ("No kernel spills to local memory. " if not spills else
           f"Spills (stored/loaded bytes per thread) in {len(spills)} of {len(records)} kernels. ")
        + ("No kernel has static shared memory; " if not smem else "")
        + "dynamic shared memory is a launch parameter (below).",
        "",
        table(records, archs),
        "",
        "Largest launches (plugins/*/*.cu): k-means 1024 threads (B < SM count, else 256), k-NN 128 threads "
        f"with {knn_smem_bytes()} B of dynamic shared memory at K = {CVIG_MAX_K}, segment mean and "
        "gather-max-rel 256 threads. A block of T threads and R registers needs ceil(R·32/256)·256·T/32 of the "
        "SM's 64 K registers: the k-means kernel's launch bounds (1024 threads) cap it at 64.",
        "",
        "k-means working set per registered variant (dynamic shared memory of one image, "
        "`cvig_kmeans_smem_bytes`) against the opt-in limit per block:",
        "",
        "| variant | N | C | κ | bytes | too large for |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v in res["variants"]:
        out.append(f"| {v['name']} | {v['n']} | {v['c']} | {v['clusters']} | {v['bytes']} "
                   f"({_kib(v['bytes'])}) | {', '.join(v['too_large_for']) or 'none'} |")
    out += ["", "Opt-in shared memory per block: " + ", ".join(
        f"{a} {_kib(LIMITS[a].smem_optin)}" for a in archs if a in LIMITS) + "."]
    out += ["", "Checks: " + ("all passed." if not res["problems"] else "; ".join(res["problems"]))]
    return "\n".join(out)


def markdown(res: Dict) -> str:
    """The section of BENCHMARKS.md: a heading, then :func:`report` (which docs/design.md holds as is)."""
    return "## CUDA kernels: registers, spills and shared memory per architecture\n\n" + report(res)


def run(build: Optional[Path] = None, log: Optional[Path] = None, jobs: int = 2) -> Dict:
    if log is not None:
        text = Path(log).read_text()
        archs = archs_of(text) or sorted({r.arch for r in parse(text)}, key=lambda a: int(re.sub(r"\D", "", a)))
    else:
        for tool in ("cmake", "nvcc"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} is required to build the CUDA kernels")
        with tempfile.TemporaryDirectory(prefix="cvig-resources-") as tmp:
            cfg, b = cmake_build(Path(build) if build else Path(tmp), jobs)
            if b is None or b.returncode != 0:
                raise SystemExit((cfg.stdout + cfg.stderr) if b is None else (b.stdout + b.stderr))
        text = b.stdout + b.stderr
        archs = archs_of(cfg.stdout)
    records = parse(text)
    shapes = model_shapes()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nvcc": f"nvcc {nvcc_version()}" if log is None else "nvcc (from a saved log)",
        "archs": archs,
        "records": [asdict(r) for r in records],
        "launches": {k: asdict(v) for k, v in LAUNCHES.items()},
        "limits": {a: asdict(LIMITS[a]) for a in archs if a in LIMITS},
        "variants": smem_fit(shapes, archs),
        "problems": check(records, shapes),
    }


def main(argv=None) -> int:
    ap = common.parser("python -m bench.cuda_resources", __doc__)
    ap.add_argument("--build", type=Path, help="build directory to use (default: a temporary one)")
    ap.add_argument("--log", type=Path, help="parse this saved build output instead of building")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--results", type=Path, help="results directory (default bench/results)")
    ap.add_argument("--markdown", type=Path, help="BENCHMARKS.md to update (default the repository's)")
    ap.add_argument("--docs", type=Path, default=DESIGN_MD, help="file with the generated block (docs/design.md)")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/design.md alone")
    args = ap.parse_args(argv)
    res = run(args.build, args.log, args.jobs)
    md = report(res)
    print(md)
    common.configure(args.results, args.markdown)
    try:
        common.publish("cuda_resources", SECTION, res, markdown)
    finally:
        common.configure()
    if not args.no_docs:
        common.update_section(SECTION, md, path=args.docs)
        print(f"wrote the '{SECTION}' block of {args.docs}")
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
