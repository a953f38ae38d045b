"""C++ runtime, TensorRT-free parts: built with CMake, unit-tested with ctest, preprocessing checked against Python."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clustervig
from clustervig.preprocess import load_batch, transform_spec

CPP = Path(__file__).resolve().parents[1] / "runtime" / "cpp"


def build_runtime(tmp_path_factory) -> Path:
    """Configure and build runtime/cpp once per session, in one folder shared by the test files that need it
    (tests/test_image_modes.py imports this): later calls find it built."""
    assert shutil.which("cmake"), "cmake is required (CI installs it)"
    b = tmp_path_factory.getbasetemp() / "cpp-build"
    if (b / "built.stamp").is_file():
        return b
    cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(b)], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    r = subprocess.run(["cmake", "--build", str(b), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (b / "built.stamp").write_text("ok")
    return b


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_runtime(tmp_path_factory)


def test_ctest_unit_tests(build):
    r = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed" in r.stdout


@pytest.mark.parametrize("model,photo,ext", [("cvig_ti", "astronaut", "jpg"), ("cvig_ti", "coffee", "png"),
                                             ("cvig_digits", "camera", "png"), ("cvig_ti", "camera", "jpg")])
def test_cpp_preprocessing_matches_python(build, tmp_path, model, photo, ext):
    from skimage import data

    arr = getattr(data, photo)()
    path = tmp_path / f"{photo}.{ext}"
    Image.fromarray(arr).save(path)
    spec = transform_spec(clustervig.get_config(model))
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "normalize_in_graph": False}))
    out = tmp_path / "out.bin"
    r = subprocess.run([str(build / "cvig_preprocess"), str(path), str(tmp_path / "spec.json"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    size = spec["img_size"]
    cpp = np.fromfile(out, dtype=np.float32).reshape(3, size, size)
    py = load_batch([path], spec)[0].numpy()
    # one 8-bit level after normalisation is 1/255/std; PIL resamples in fixed point, we in double
    level = 1 / 255 / min(spec["std"])
    diff = np.abs(cpp - py)
    assert diff.max() <= 2.01 * level and diff.mean() <= 0.25 * level


def test_cpp_reads_the_preprocess_json_cvig_export_writes(build, tmp_path):
    from click.testing import CliRunner
    from skimage import data

    from clustervig.export.cli import main as export_main
    from clustervig.train import WEIGHTS_DIR

    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--no-validate",
                                           "--no-engine", "--normalize-in-graph", "-o", str(out)])
    assert res.exit_code == 0, res.output
    path = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    r = subprocess.run([str(build / "cvig_preprocess"), str(path), str(out / "preprocess.json"), str(tmp_path / "x.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["normalize_in_graph"] is True and spec["img_size"] == 32
    cpp = np.fromfile(tmp_path / "x.bin", dtype=np.float32).reshape(3, 32, 32)
    # normalize_in_graph: C++ emits RGB in [0, 1], as the Python runtime feeds such a graph
    mean = np.asarray(spec["mean"], np.float32).reshape(3, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(3, 1, 1)
    py = load_batch([path], spec)[0].numpy() * std + mean
    assert 0.0 <= cpp.min() and cpp.max() <= 1.0
    assert np.abs(cpp - py).max() <= 2.01 / 255


def test_cpp_errors_name_the_file(build, tmp_path):
    (tmp_path / "spec.json").write_text("{}")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = subprocess.run([str(build / "cvig_preprocess"), str(bad), str(tmp_path / "spec.json"), str(tmp_path / "o.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and str(bad) in r.stderr
    gif = tmp_path / "photo.gif"
    Image.new("RGB", (16, 16)).save(gif)
    r = subprocess.run([str(build / "cvig_preprocess"), str(gif), str(tmp_path / "spec.json"), str(tmp_path / "o.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{gif} is a GIF file" in r.stderr and "convert it to PNG or JPEG" in r.stderr
    # CMYK JPEGs are read (PIL's conversion), as in Python: tests/test_image_modes.py checks the bytes
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)
    r = subprocess.run([str(build / "cvig_preprocess"), str(cmyk), str(tmp_path / "spec.json"), str(tmp_path / "o.bin")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bad_tensorrt_root_fails_at_configure_time(tmp_path):
    b = tmp_path / "b"
    cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(b), "-DCVIG_TRT_ROOT=/bad/path"],
                         capture_output=True, text=True)
    out = cfg.stdout + cfg.stderr
    assert cfg.returncode != 0, out
    assert "CVIG_TRT_ROOT=/bad/path is not a TensorRT root" in out and "/bad/path/include/NvInfer.h" in out, out
    assert "/usr/src/tensorrt" in out and not (b / "Makefile").exists()


TRT_ROOTS = [p for p in os.environ.get("CVIG_TRT_HEADERS", "").split(":") if p]


@pytest.mark.trt
@pytest.mark.skipif(not TRT_ROOTS, reason="set CVIG_TRT_HEADERS=<root>[:<root>] to compile-check the TensorRT runner")
@pytest.mark.parametrize("root", TRT_ROOTS or ["-"])
def test_engine_runner_compiles_against_tensorrt_headers(tmp_path, root):
    b = tmp_path / "b"
    cfg = subprocess.run(["cmake", "-S", str(CPP), "-B", str(b), f"-DCVIG_TRT_ROOT={root}"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    r = subprocess.run(["cmake", "--build", str(b), "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
