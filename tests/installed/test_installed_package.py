"""The package as users get it: the wheel installed (not editable) into an environment of its own, used
from outside the source tree. `.ci/run` builds the sdist, the wheel from the sdist, installs it and runs
this file (with `CVIG_TEST_INSTALLED=1`, which makes tests/conftest.py collect it) and
tests/test_kernels_host.py with that environment's Python, from a temporary folder. Only data files
(the authors' checkpoint fixture) are read from the checkout; every line of code under test comes from
site-packages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest

import clustervig
from clustervig.plugins import kernels as K

REPO = Path(__file__).resolve().parents[2]
PKG = Path(clustervig.__file__).resolve().parent
BIN = Path(sys.executable).parent
VERSION = version("clustervig-trt")


def cvig(*args, cwd: Path, env=None, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "cvig"), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    return r


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def test_runs_from_the_installed_package():
    assert "site-packages" in PKG.parts and REPO not in PKG.parents
    assert not any(Path(p or ".").resolve() == REPO for p in sys.path), "the checkout is on sys.path"
    assert K.INSTALLED and K.PLUGINS == PKG / "plugins"
    # the prebuilt host library, built from exactly the sources the package carries
    assert K.find_host_library() == K.PACKAGED_HOST == PKG / "plugins" / "lib" / "libcvig_kernels_host.so"
    rec = json.loads((PKG / "plugins" / "lib" / "libcvig_kernels_host.json").read_text())
    assert rec["source_digest"] == K.source_digest()
    for src in ("CMakeLists.txt", "common/cvig_kernels.h", "common/cvig_cuda.cuh", "kmeans/kmeans_kernel.cu",
                "knn/cvigPartitionedKNNPlugin.cpp", "segment/segment_impl.h", "tests/sanitize_kernels.cpp"):
        assert (PKG / "plugins" / src).is_file(), src
    for src in ("CMakeLists.txt", "src/engine.cpp", "include/cvig/engine.h", "apps/cvig_infer.cpp"):
        assert (PKG / "runtime" / "cpp" / src).is_file(), src


def test_no_compiler_is_needed(tmp_path):
    # the kernels run from the wheel's library: nothing is compiled, nothing written to a build cache
    code = ("import numpy as np; from clustervig.plugins import kernels as K; "
            "x = np.random.default_rng(0).standard_normal((2, 64, 8)).astype(np.float32); "
            "print(K.kmeans(x, 4, 5)[1].sum())")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "CXX": "/nonexistent/c++", K.ENV_CACHE: str(tmp_path / "cache"),
                            "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 0 and r.stdout.strip() == "128", r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg").exists()


def test_version_everywhere(tmp_path):
    assert ok(cvig("--version", cwd=tmp_path)).stdout.strip() == f"cvig, version {VERSION}"
    assert clustervig.__version__ == VERSION


def test_metadata_lists_what_the_package_needs():
    reqs = requires("clustervig-trt") or []
    base = [r for r in reqs if "extra ==" not in r]
    names = {re.split(r"[<>=!~;\[ ]", r)[0].lower() for r in base}
    assert not names & {"pytest", "pytest-xdist", "tritonclient", "matplotlib", "cuda-bindings", "build"}, names
    # every base requirement is imported by the package's own code
    imports = {"torch": "torch", "numpy": "numpy", "click": "click", "onnx": "onnx", "onnxruntime": "onnxruntime",
               "pillow": "PIL", "scikit-learn": "sklearn", "polygraphy": "polygraphy",
               "onnx-graphsurgeon": "onnx_graphsurgeon", "onnxruntime-extensions": "onnxruntime_extensions",
               "scikit-image": "skimage"}
    assert names == set(imports), f"update this table: {sorted(names ^ set(imports))}"
    code = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    for name, mod in imports.items():
        assert re.search(rf"^\s*(import|from) {mod}\b", code, re.M), f"{name} is required but never imported"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Data for the commands, written by the installed `cvig dataset`."""
    d = tmp_path_factory.mktemp("work")
    ok(cvig("dataset", "digits", "--split", "train", "--per-class", "6", "-o", d / "calib", cwd=d))
    ok(cvig("dataset", "digits", "--split", "test", "--per-class", "3", "-o", d / "heldout", cwd=d))
    assert len(list((d / "heldout").rglob("*.png"))) == 30
    return d


@pytest.fixture(scope="module")
def exported(work):
    ck = PKG / "weights" / "cvig_digits.pth"
    r = ok(cvig("export", "--checkpoint", ck, "--fp16", "--int8", "--calib-dir", work / "calib", "--plugins",
                "-o", work / "out", cwd=work))
    assert "gates (all passed)" in r.stdout
    return work / "out"


def test_export_fp16_int8_plugins(exported):
    names = {p.name for p in exported.iterdir()}
    for f in ("model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx", "model_plugins.onnx", "report.json",
              "labels.txt", "preprocess.json"):
        assert f in names, f
    report = json.loads((exported / "report.json").read_text())
    assert VERSION in json.dumps(report), "the package version is not recorded in report.json"


def test_compare_run_bench_accuracy(exported, work):
    ck = PKG / "weights" / "cvig_digits.pth"
    r = ok(cvig("compare", exported / "model_fp32.onnx", exported / "model_plugins.onnx", "--checkpoint", ck,
                cwd=work))
    assert r.stdout.strip().splitlines()[-1] == "PASSED" and "model_plugins.onnx vs pytorch: PASSED" in r.stdout
    img = sorted((work / "heldout").rglob("*.png"))[0]
    run = json.loads(ok(cvig("run", exported / "model_fp32.onnx", img, "--json", cwd=work)).stdout)
    assert run[0]["file"].endswith(img.name) and run[0]["top"][0]["name"] == img.parent.name  # its class folder
    bench = json.loads(ok(cvig("bench", exported / "model_fp32.onnx", "--iters", "2", "--warmup", "1", "--json",
                               cwd=work)).stdout)
    assert [row["batch"] for row in bench["rows"]] == [1] and bench["rows"][0]["throughput_img_s"] > 0
    acc = json.loads(ok(cvig("accuracy", exported / "model_fp32.onnx", exported / "model_plugins.onnx", "--folder",
                             work / "heldout", "--checkpoint", ck, "--json", cwd=work)).stdout)
    tops = [row["top1"] for row in acc]
    assert len(tops) == 3 and min(tops) >= 0.9 and len(set(tops)) == 1, acc  # PyTorch = FP32 = plugin graph


def test_convert_profile(tmp_path):
    src = REPO / "tests" / "fixtures" / "authors" / "authors_small_state.pth"
    cfg = REPO / "tests" / "fixtures" / "authors" / "config.json"
    ok(cvig("convert", "--from", "authors", src, "--config", cfg, "-o", tmp_path / "converted.pth", cwd=tmp_path))
    assert (tmp_path / "converted.pth").stat().st_size > 0
    r = ok(cvig("profile", "--model", "cvig_digits", "--json", cwd=tmp_path))
    assert "cvig_digits" in r.stdout


def test_doctor(tmp_path):
    r = cvig("doctor", "--json", cwd=tmp_path, env={"CVIG_HOME": str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": ""})
    out = json.loads(ok(r).stdout)
    status = {c["name"]: c["status"] for c in out["checks"]}
    assert status["host kernels"] == "PASS" and status["ONNX Runtime"] == "PASS"
    assert all(status[n] == "SKIPPED" for n in ("CUDA kernels", "TensorRT plugins", "TensorRT engine"))
    assert all(c["detail"] for c in out["checks"])
    assert out["versions"]["clustervig-trt"] == VERSION
    assert out["libraries"]["host kernels"].startswith(str(PKG / "plugins" / "lib"))


def test_build_plugins_from_the_installed_sources(tmp_path):
    """`cvig build-plugins` builds the CUDA kernels from the package's sources (CI has nvcc, no GPU)."""
    assert shutil.which("nvcc") and shutil.which("cmake"), "nvcc and cmake are required (CI installs them)"
    home = tmp_path / "home"
    r = ok(cvig("build-plugins", "--kernels-only", "--cuda-archs", "87", "-o", tmp_path / "libs", "-j", "2",
                cwd=tmp_path, env={"CVIG_HOME": str(home)}))
    assert (tmp_path / "libs" / "libcvig_kernels.so").is_file(), r.stderr
    found = subprocess.run([sys.executable, "-c", "from clustervig.plugins import kernels as K; print(K.find_library())"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "CVIG_HOME": str(home)})
    assert found.stdout.strip() == str((tmp_path / "libs" / "libcvig_kernels.so").resolve())
