"""``cvig build-plugins``: the CUDA kernels and the TensorRT plugin libraries, built on the target machine
from the sources the installed package carries (``clustervig/plugins/``, the same CMake project as a
checkout's ``plugins/``), for the local GPU's architecture, and recorded (:mod:`clustervig.plugins.locations`)
so ``cvig export``, ``cvig run``, ``cvig compare`` and ``open_session`` find them without flags.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from ..cliutil import CTX

HOW_NVCC = ("install the CUDA toolkit (JetPack ships it on Jetson; on a desktop NVIDIA's CUDA toolkit packages "
            "or archives), put its bin/ on PATH or set CUDACXX=/path/to/nvcc")
HOW_TRT = ("install TensorRT with its headers (JetPack on Jetson: /usr/include/<arch>-linux-gnu/NvInfer*.h; desktop: "
           "NVIDIA's TensorRT tar archive or the libnvinfer-dev package) and pass --trt-root DIR (the folder holding "
           "include/), or add --kernels-only to build the CUDA kernels alone")
HOW_CMAKE = "install CMake 3.24 or newer (e.g. `pip install cmake` or your system's package)"


class BuildError(click.ClickException):
    """One line: what is missing or failed, and how to get it."""


def find_nvcc() -> Optional[str]:
    cands = [shutil.which("nvcc"), os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(str(Path(home) / "bin" / "nvcc"))
    return next((c for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def trt_include(root: Path) -> Optional[Path]:
    """The folder with NvInferRuntime.h under a TensorRT root: include/ or Debian/JetPack's include/<triplet>/."""
    for d in [root / "include", *sorted((root / "include").glob("*-linux-gnu"))]:
        if (d / "NvInferRuntime.h").is_file():
            return d
    return None


def find_trt_root(explicit: Optional[Path] = None) -> Optional[Path]:
    """``explicit``, else ``$CVIG_TRT_ROOT`` / ``$TENSORRT_ROOT``, else the usual install places."""
    if explicit is not None:
        return Path(explicit)
    cands = [os.environ.get("CVIG_TRT_ROOT"), os.environ.get("TENSORRT_ROOT"), "/usr", "/usr/local/tensorrt",
             "/opt/tensorrt", "/usr/src/tensorrt", *sorted(str(p) for p in Path("/usr/local").glob("TensorRT-*"))]
    return next((Path(c) for c in cands if c and trt_include(Path(c)) is not None), None)


def trt_version(include: Path) -> str:
    text = (include / "NvInferVersion.h").read_text(errors="replace") if (include / "NvInferVersion.h").is_file() else ""
    parts = [re.search(rf"#define\s+(?:NV_TENSORRT|TRT)_{k}(?:_ENTERPRISE)?\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts if m) or "unknown"


def gpu_archs() -> Tuple[List[str], str]:
    """Compute capabilities of the local GPUs as CMake architectures (['87'], ['90']) and where they came from."""
    smi = shutil.which("nvidia-smi")
    if smi:
        res = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
        caps = [c.strip() for c in res.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", c.strip())]
        if res.returncode == 0 and caps:
            return sorted({c.replace(".", "") for c in caps}), "nvidia-smi"
    try:
        import torch

        if torch.cuda.is_available():
            caps = {"".join(map(str, torch.cuda.get_device_capability(i))) for i in range(torch.cuda.device_count())}
            return sorted(caps), "torch.cuda"
    except Exception:  # noqa: BLE001 - a broken CUDA setup is reported as "no GPU found" below
        pass
    if Path("/etc/nv_tegra_release").is_file():  # a Jetson without nvidia-smi's query: Orin
        return ["87"], "/etc/nv_tegra_release (Jetson Orin)"
    return [], ""


def default_output() -> Path:
    from ..plugins import locations

    return locations.home() / "plugins"


def sources() -> Path:
    from ..plugins import kernels

    return kernels.PLUGINS


def _run(cmd: Sequence[str], what: str, log: List[str]) -> None:
    click.echo("  " + " ".join(str(c) for c in cmd), err=True)
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.append(" ".join(str(c) for c in cmd) + "\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "error" in ln.lower()] or \
            (res.stdout + res.stderr).strip().splitlines()[-3:]
        raise BuildError(f"{what} failed (exit {res.returncode}): {' | '.join(lines[:3])[:600]}")


def build(output: Path, archs: Sequence[str], trt_root: Optional[Path], jobs: int, werror: bool = True) -> Dict[str, Path]:
    """Configure and build the CMake project of the installed sources into ``output/build``, copy the
    libraries to ``output`` and return them by kind. ``trt_root`` None: the CUDA kernels only."""
    from ..plugins.locations import KINDS

    cmake, nvcc = shutil.which("cmake"), find_nvcc()
    if not cmake:
        raise BuildError(f"cmake not found: {HOW_CMAKE}")
    if not nvcc:
        raise BuildError(f"nvcc (the CUDA compiler) not found: {HOW_NVCC}")
    src, build_dir = sources(), output / "build"
    if not (src / "CMakeLists.txt").is_file():
        raise BuildError(f"the plugin sources are not at {src} (the package is incomplete): reinstall clustervig-trt")
    log: List[str] = []
    configure = [cmake, "-S", src, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DCVIG_CUDA_ARCHS={';'.join(archs)}", f"-DCVIG_WERROR={'ON' if werror else 'OFF'}"]
    if trt_root is not None:
        configure.append(f"-DCVIG_TRT_ROOT={trt_root}")
    try:
        _run(configure, "CMake configure", log)
        _run([cmake, "--build", build_dir, "-j", str(jobs)], "the build", log)
    finally:
        output.mkdir(parents=True, exist_ok=True)
        (output / "build.log").write_text("\n".join(log))
    wanted = ["kernels"] + (["plugins", "plugins_autoreg"] if trt_root is not None else [])
    built: Dict[str, Path] = {}
    for kind in wanted:
        lib = build_dir / KINDS[kind]
        if not lib.is_file():
            raise BuildError(f"{lib} was not built: see {output / 'build.log'}")
        dest = output / KINDS[kind]
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(lib, tmp)
        os.replace(tmp, dest)  # a library in use by another process keeps its old inode
        built[kind] = dest
    return built


@click.command("build-plugins", context_settings=CTX, epilog="""
\b
Examples:
  cvig build-plugins                                  # the local GPU's architecture, TensorRT found in /usr
  cvig build-plugins --trt-root ~/TensorRT-10.3.0.26  # a TensorRT tar archive
  cvig build-plugins --cuda-archs 87 --trt-root /usr  # Jetson Orin (JetPack 6)
  cvig build-plugins --kernels-only                   # libcvig_kernels.so alone (no TensorRT)
  cvig doctor                                         # then check what was built
""")
@click.option("--cuda-archs", default=None, help="CUDA architectures, e.g. 87 or '86;90' (default: the local GPUs', "
              "from nvidia-smi).")
@click.option("--trt-root", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="TensorRT root holding include/NvInferRuntime.h (default: $CVIG_TRT_ROOT, /usr, /usr/local/TensorRT-*).")
@click.option("--kernels-only", is_flag=True, help="Build libcvig_kernels.so alone (no TensorRT needed).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the libraries (default: $CVIG_HOME/plugins, i.e. ~/.local/share/clustervig/plugins).")
@click.option("-j", "--jobs", type=click.IntRange(1), default=os.cpu_count() or 2, show_default="CPU count",
              help="Parallel compile jobs.")
@click.option("--no-werror", is_flag=True, help="Do not treat compiler warnings as errors (a newer compiler may warn).")
@click.option("--no-record", is_flag=True, help="Build only; do not make the other commands use these libraries.")
def command(cuda_archs, trt_root, kernels_only, output, jobs, no_werror, no_record) -> None:
    """Build the CUDA kernels (libcvig_kernels.so) and the TensorRT plugin libraries (libcvig_plugins.so and
    libcvig_plugins_autoreg.so, the one that registers itself when loaded) from the installed sources, and
    record where they are: cvig export, run and compare and the Python Session then use them without
    --plugins-lib. Needs CMake, nvcc and (unless --kernels-only) TensorRT's headers. A plugin library
    works only with the TensorRT major it was built against: build again after upgrading TensorRT."""
    from ..plugins import locations

    if cuda_archs:
        archs = [a.strip() for a in re.split(r"[;,\s]+", cuda_archs) if a.strip()]
        if not all(re.fullmatch(r"\d{2,3}[a-z]?", a) for a in archs):
            raise click.BadParameter(f"{cuda_archs!r}: give compute capabilities like 87 or '86;90'",
                                     param_hint="--cuda-archs")
        arch_source = "--cuda-archs"
    else:
        archs, arch_source = gpu_archs()
        if not archs:
            raise BuildError("no NVIDIA GPU found to build for (nvidia-smi and torch.cuda see none): pass "
                             "--cuda-archs, e.g. 87 for Jetson Orin, 89 for an RTX 4090, 90 for an H100")
    root = None
    if not kernels_only:
        root = find_trt_root(trt_root)
        if root is None or trt_include(root) is None:
            where = f"{trt_root} has no include/NvInferRuntime.h" if trt_root else "TensorRT's headers were not found"
            raise BuildError(f"{where}: {HOW_TRT}")
    output = Path(output) if output else default_output()
    what = "CUDA kernels" + (f" and TensorRT {trt_version(trt_include(root))} plugins" if root else "")
    click.echo(f"building the {what} for sm_{', sm_'.join(archs)} ({arch_source}) from {sources()} into {output}",
               err=True)
    built = build(output, archs, root, jobs, werror=not no_werror)
    for kind, path in built.items():
        click.echo(f"{kind}: {path}")
    if no_record:
        return
    details = {"cuda_archs": archs, "trt_root": str(root) if root else None,
               "tensorrt": trt_version(trt_include(root)) if root else None, "python": sys.executable}
    rec = locations.record({k: str(v) for k, v in built.items()}, details)
    click.echo(f"recorded in {rec}: cvig export/run/compare use these libraries from now on", err=True)
