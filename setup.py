"""Wheel build: the package as pyproject.toml declares it, plus the compiled host kernels and their sources.

setuptools, not a CMake-driven backend: the only compiled piece of a wheel is libcvig_kernels_host.so,
one compiler command with no Python ABI in it (loaded with ctypes), so building it needs a C++ compiler
and nothing else, not CMake, not nvcc (plugins/python/hostbuild.py holds the command, shared with the
build on first use in a checkout). The kernel, TensorRT plugin and sanitizer sources with their CMake
file go into clustervig/plugins/ and the C++ runtime into clustervig/runtime/cpp/, so `cvig build-plugins`
can build the CUDA and TensorRT libraries on the target from the installed package. The wheel is tagged
py3-none-<platform>: one wheel per OS and CPU architecture, any Python 3.
"""
import importlib.util
import json
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = Path(__file__).resolve().parent


def _hostbuild():
    spec = importlib.util.spec_from_file_location("cvig_hostbuild", HERE / "plugins" / "python" / "hostbuild.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPy(build_py):
    """Copies the C++ sources into the package and compiles the host kernel library beside them."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable checkout builds the library on first use from plugins/
        hb = _hostbuild()
        plugins, pkg = HERE / "plugins", Path(self.build_lib) / "clustervig" / "plugins"
        hb.copy_sources(plugins, pkg)
        compiler = hb.find_compiler()
        if compiler is None:
            raise SystemExit("building clustervig-trt needs a C++ compiler (g++ or clang++, or set CXX) for "
                             f"{hb.LIBRARY}; install one, e.g. `apt-get install g++`")
        lib_dir = pkg / "lib"
        lib_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / hb.LIBRARY
            print(f"compiling {hb.LIBRARY} with {compiler}")
            cmd = hb.compile_host_library(pkg, out, compiler)
            (lib_dir / hb.LIBRARY).write_bytes(out.read_bytes())
        (lib_dir / hb.LIBRARY).chmod(0o755)
        record = {"source_digest": hb.source_digest(pkg), "compiler": compiler, "flags": list(hb.HOST_FLAGS),
                  "command": " ".join(cmd[:1] + list(hb.HOST_FLAGS))}
        (lib_dir / "libcvig_kernels_host.json").write_text(json.dumps(record, indent=2) + "\n")


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # a platform wheel: it holds a compiled library


class BdistWheel(bdist_wheel):
    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat  # no Python extension module: any Python 3 on this platform


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel}, distclass=BinaryDistribution)
