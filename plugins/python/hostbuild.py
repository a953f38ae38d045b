"""How ``libcvig_kernels_host.so`` is compiled, in one place: the wheel build (``setup.py``, which loads
this file by path, before any dependency is installed) and the build on first use in a checkout
(:mod:`clustervig.plugins.kernels`) both call :func:`compile_host_library`. Standard library only.

Where the sources are: in a checkout, ``plugins/`` beside ``plugins/python/`` (this file's folder); in an
installed package, the package folder ``clustervig/plugins/`` itself, which carries ``common/``,
``kmeans/``, ``knn/``, ``segment/`` and ``CMakeLists.txt`` as package data.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

HOST_SOURCES = ("kmeans/kmeans_host.cpp", "knn/knn_host.cpp", "segment/segment_host.cpp")
# the flags of the cvig_kernels_host CMake target (plugins/CMakeLists.txt); -ffp-contract=off keeps
# the host's rounding identical to the CUDA kernels'
HOST_FLAGS = ("-std=c++17", "-O3", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-DCVIG_HOST_ONLY")
# the source folders and files a package carries, so every library can be built on the target
SOURCE_ITEMS = ("CMakeLists.txt", "README.md", "common", "kmeans", "knn", "segment", "tests/sanitize_kernels.cpp")
LIBRARY = "libcvig_kernels_host.so"


def plugins_dir(here: Optional[Path] = None) -> Path:
    """The folder holding the kernel sources (``common/cvig_kernels.h`` inside): installed or checkout layout."""
    here = Path(here or Path(__file__).resolve().parent)
    return here if (here / "common" / "cvig_kernels.h").is_file() else here.parent


def source_files(plugins: Path) -> List[Path]:
    """Every file the host library is built from, in a fixed order."""
    files = [plugins / "common" / "cvig_kernels.h"]
    files += sorted((plugins / "common").glob("*.h"))
    for src in HOST_SOURCES:
        folder = (plugins / src).parent
        files += sorted(folder.glob("*_impl.h")) + [plugins / src]
    return list(dict.fromkeys(files))


def source_digest(plugins: Path) -> str:
    """SHA-256 (first 16 hex digits) of the host library's sources and flags: names a build of exactly them."""
    h = hashlib.sha256(" ".join(HOST_FLAGS).encode())
    for f in source_files(plugins):
        h.update(str(f.relative_to(plugins)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def find_compiler() -> Optional[str]:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def compile_host_library(plugins: Path, out: Path, compiler: str, extra: Sequence[str] = ()) -> List[str]:
    """Compile the host library to ``out``; returns the command. Raises RuntimeError with the compiler's output."""
    cmd = [compiler, *HOST_FLAGS, *extra, f"-I{plugins / 'common'}", *(str(plugins / s) for s in HOST_SOURCES),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building {LIBRARY} failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
    return cmd


def copy_sources(plugins: Path, dest: Path) -> None:
    """The kernel, plugin and sanitizer-driver sources with their CMake file, as a package carries them."""
    for item in SOURCE_ITEMS:
        src, dst = plugins / item, dest / item
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def build_once(lib: Path, make: Callable[[Path, Path], None]) -> Path:
    """``lib`` unless it exists, else ``make(work_dir, output)`` writes it in a temporary folder beside it and it is
    moved in: concurrent builds wait on a lock file in the same folder, and no partial file is ever visible."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_file():
            return lib
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            make(Path(tmp), out)
            os.replace(out, lib)
    return lib
