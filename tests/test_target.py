"""On a target machine: `cvig doctor`, `cvig build-plugins`, where built libraries are recorded, and the
one-layer plugin graphs the doctor turns into TensorRT engines (checked here in ONNX Runtime)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from clustervig.plugins import kernels as K
from clustervig.plugins import locations
from clustervig.target import build_plugins, doctor, plugin_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv(locations.ENV_HOME, str(tmp_path / "home"))
    monkeypatch.delenv(locations.ENV_PLUGINS, raising=False)
    monkeypatch.delenv(K.ENV, raising=False)
    return tmp_path / "home"


def _cvig(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "clustervig.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)


# ----------------------------------------------------------------------------
# cvig doctor
# ----------------------------------------------------------------------------


def test_doctor_on_this_machine(home):
    r = _cvig("doctor", "--json", env={"CVIG_HOME": str(home), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert list(checks) == ["host kernels", "ONNX Runtime", "CUDA kernels", "TensorRT plugins", "TensorRT engine"]
    assert checks["host kernels"]["status"] == "PASS" and "numpy references" in checks["host kernels"]["detail"]
    assert checks["ONNX Runtime"]["status"] == "PASS"
    # no GPU and no TensorRT here: skipped, each with the reason and the way out
    assert checks["CUDA kernels"]["status"] == "SKIPPED" and "no CUDA GPU" in checks["CUDA kernels"]["detail"]
    for name in ("TensorRT plugins", "TensorRT engine"):
        if importlib_has("tensorrt"):
            continue
        assert checks[name]["status"] == "SKIPPED" and "TensorRT is not installed" in checks[name]["detail"]
    assert out["ok"] is True
    v = out["versions"]
    import onnxruntime
    import torch

    assert v["torch"] == torch.__version__ and v["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in v["onnxruntime providers"]
    assert out["libraries"]["record of cvig build-plugins"] == str(home / "libraries.json")
    assert Path(out["libraries"]["kernel and plugin sources"], "common", "cvig_kernels.h").is_file()


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_doctor_text_report_and_failure_exit_code(home, monkeypatch, tmp_path):
    # a host library that is not one: the host check fails, the others still run, exit code 1
    bad = tmp_path / "libcvig_kernels_host.so"
    bad.write_bytes(b"\x7fELF not really")
    r = _cvig("doctor", env={"CVIG_HOME": str(home), K.ENV_HOST: str(bad), "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    host = next(line for line in lines if line.startswith("FAIL") and "host kernels" in line)
    assert "cannot load" in host and str(bad) in host
    assert any(line.startswith("SKIPPED  CUDA kernels") for line in lines)
    # the ONNX Runtime check runs the plugin graph on the host kernels too: it fails for the same reason
    onnx_line = next(line for line in lines if "ONNX Runtime" in line and not line.startswith("onnxruntime"))
    assert onnx_line.startswith("FAIL") and "cannot load" in onnx_line
    assert lines[-1] == "0 passed, 2 failed, 3 skipped"
    assert "Traceback" not in r.stdout + r.stderr


def test_doctor_reports_a_wrong_result():
    # a check whose result is wrong is FAIL with the difference named, and the next check still runs
    def wrong():
        doctor._equal(np.array([1, 2, 3]), np.array([1, 2, 4]), "labels")

    results = doctor.run_checks([("wrong", wrong), ("host kernels", doctor.check_host_kernels)])
    assert [c.status for c in results] == ["FAIL", "PASS"]
    assert results[0].detail == "AssertionError: labels differ (1 of 3 elements)"


def test_doctor_help_says_what_it_checks():
    r = CliRunner().invoke(doctor.command, ["--help"])
    assert r.exit_code == 0 and "PASS, FAIL or SKIPPED" in r.output and "cvig build-plugins" in r.output


# ----------------------------------------------------------------------------
# One-layer plugin graphs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", plugin_layers.cases(), ids=lambda c: c.op)
def test_plugin_layer_graph_runs_on_the_host_kernels(case):
    """Each FP32 one-layer graph, in ONNX Runtime with the CPU plugin ops, equals the host kernels exactly."""
    from clustervig.export.plugin_graph import ort_session

    lib = K.host_library()
    feed, expected = case.run_host(np.float32, lib)
    model = case.graph(np.float32)
    onnx.checker.check_model(model)
    sess = ort_session(model)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want)
    node = model.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "cvig" and attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b""


@pytest.mark.parametrize("case", plugin_layers.cases(), ids=lambda c: c.op)
def test_plugin_layer_graph_fp16_types(case, tmp_path):
    model = case.graph(np.float16)
    path = plugin_layers.save(model, tmp_path / "m.onnx")
    loaded = onnx.load(str(path))
    types = {v.name: v.type.tensor_type.elem_type for v in list(loaded.graph.input) + list(loaded.graph.output)}
    for name, kind in list(case.inputs) + list(case.outputs):
        assert types[name] == (onnx.TensorProto.FLOAT16 if kind == "x" else onnx.TensorProto.INT32), name
    feed, expected = case.run_host(np.float16, K.host_library())
    assert feed["x"].dtype == np.float16
    for (name, kind) in case.outputs:
        assert expected[name].dtype == (np.float16 if kind == "x" else np.int32)


# ----------------------------------------------------------------------------
# Where built libraries are recorded
# ----------------------------------------------------------------------------


def test_locations_record_and_precedence(home, tmp_path, monkeypatch):
    assert locations.read() == {} and locations.recorded("plugins") is None
    libs = {k: tmp_path / name for k, name in locations.KINDS.items()}
    for p in libs.values():
        p.write_bytes(b"x")
    rec = locations.record({k: str(v) for k, v in libs.items()}, {"tensorrt": "10.3.0"})
    assert rec == home / "libraries.json" and json.loads(rec.read_text())["tensorrt"] == "10.3.0"
    assert locations.recorded("plugins") == libs["plugins"].resolve()
    assert locations.plugin_library() == libs["plugins"].resolve()
    assert K.find_library() == libs["kernels"].resolve()
    # explicit beats the environment beats the record
    other = tmp_path / "other.so"
    monkeypatch.setenv(locations.ENV_PLUGINS, str(other))
    assert locations.plugin_library() == other
    assert locations.plugin_library(tmp_path / "x.so") == tmp_path / "x.so"
    monkeypatch.setenv(K.ENV, str(other))
    other.write_bytes(b"y")
    assert K.find_library() == other
    # a recorded file that has gone is not offered
    libs["plugins"].unlink()
    monkeypatch.delenv(locations.ENV_PLUGINS)
    assert locations.recorded("plugins") is None
    with pytest.raises(ValueError, match="unknown library kinds"):
        locations.record({"kernel": "x"})
    rec.write_text("{not json")
    assert locations.read() == {}


# ----------------------------------------------------------------------------
# cvig build-plugins
# ----------------------------------------------------------------------------


def test_build_plugins_without_nvcc_says_what_is_missing(home, monkeypatch):
    monkeypatch.setattr(build_plugins, "find_nvcc", lambda: None)
    r = CliRunner().invoke(build_plugins.command, ["--kernels-only", "--cuda-archs", "87"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: nvcc (the CUDA compiler) not found: install the CUDA toolkit")
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (home / "libraries.json").exists()


def test_nvcc_is_found_where_cuda_puts_it(tmp_path, monkeypatch):
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    found = build_plugins.find_nvcc()
    assert found is None or found == "/usr/local/cuda/bin/nvcc"  # only the standard install place is left
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert build_plugins.find_nvcc() == str(fake)
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDACXX", str(fake))
    assert build_plugins.find_nvcc() == str(fake)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert build_plugins.find_nvcc() == str(fake)


def test_build_plugins_without_tensorrt_says_what_is_missing(home, tmp_path):
    r = _cvig("build-plugins", "--cuda-archs", "87", "--trt-root", str(tmp_path), env={"CVIG_HOME": str(home)})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert f"{tmp_path} has no include/NvInferRuntime.h" in last and "--kernels-only" in last and "JetPack" in last
    r = _cvig("build-plugins", "--cuda-archs", "8.7", env={"CVIG_HOME": str(home)})
    assert r.returncode == 2 and "give compute capabilities like 87" in r.stderr


def test_build_plugins_without_a_gpu_asks_for_archs(home, monkeypatch):
    monkeypatch.setattr(build_plugins, "gpu_archs", lambda: ([], ""))
    r = CliRunner().invoke(build_plugins.command, ["--kernels-only"])
    assert r.exit_code == 1 and "no NVIDIA GPU found" in r.output and "--cuda-archs" in r.output


def test_gpu_archs_from_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 8.7\necho 9.0\necho 8.7\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert build_plugins.gpu_archs() == (["87", "90"], "nvidia-smi")


def test_build_plugins_kernels_only_builds_and_records(home, tmp_path):
    """The CUDA kernels from the package's own sources for one architecture, recorded for find_library."""
    assert shutil.which("nvcc") and shutil.which("cmake"), "nvcc and cmake are required (CI installs them)"
    out = tmp_path / "libs"
    r = _cvig("build-plugins", "--kernels-only", "--cuda-archs", "87", "-o", str(out), "-j", "2",
              env={"CVIG_HOME": str(home)})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lib = out / "libcvig_kernels.so"
    assert lib.is_file() and r.stdout.strip() == f"kernels: {lib}"
    rec = json.loads((home / "libraries.json").read_text())
    assert rec["libraries"] == {"kernels": str(lib.resolve())} and rec["cuda_archs"] == ["87"] and rec["trt_root"] is None
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert " T cvig_kmeans_launch" in syms
    if shutil.which("cuobjdump"):
        elf = subprocess.run(["cuobjdump", "--list-elf", str(lib)], capture_output=True, text=True).stdout
        assert "sm_87" in elf and "sm_90" not in elf
    # every command now finds it without flags
    found = subprocess.run([sys.executable, "-c", "from clustervig.plugins import kernels as K; print(K.find_library())"],
                           capture_output=True, text=True, env={**os.environ, "CVIG_HOME": str(home)})
    assert found.stdout.strip() == str(lib.resolve())


def test_trt_root_layouts(tmp_path):
    # a tar archive's include/, and Debian's / JetPack's include/<triplet>/ under /usr
    (tmp_path / "a" / "include").mkdir(parents=True)
    (tmp_path / "a" / "include" / "NvInferRuntime.h").write_text("")
    (tmp_path / "a" / "include" / "NvInferVersion.h").write_text(
        "#define TRT_MAJOR_ENTERPRISE 11\n#define TRT_MINOR_ENTERPRISE 4\n#define TRT_PATCH_ENTERPRISE 1\n")
    (tmp_path / "b" / "include" / "aarch64-linux-gnu").mkdir(parents=True)
    (tmp_path / "b" / "include" / "aarch64-linux-gnu" / "NvInferRuntime.h").write_text("")
    (tmp_path / "b" / "include" / "aarch64-linux-gnu" / "NvInferVersion.h").write_text(
        "#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 3\n#define NV_TENSORRT_PATCH 0\n")
    assert build_plugins.trt_include(tmp_path / "a") == tmp_path / "a" / "include"
    assert build_plugins.trt_include(tmp_path / "b") == tmp_path / "b" / "include" / "aarch64-linux-gnu"
    assert build_plugins.trt_include(tmp_path) is None
    assert build_plugins.trt_version(tmp_path / "a" / "include") == "11.4.1"
    assert build_plugins.trt_version(tmp_path / "b" / "include" / "aarch64-linux-gnu") == "10.3.0"
    assert build_plugins.find_trt_root(tmp_path / "b") == tmp_path / "b"


@pytest.mark.trt
@pytest.mark.skipif(not os.environ.get("CVIG_TRT_HEADERS"),
                    reason="set CVIG_TRT_HEADERS=<root>[:<root>] (dirs with include/NvInferRuntime.h) to build the plugins")
def test_build_plugins_against_tensorrt_headers(home, tmp_path):
    """The plugin libraries from the package's sources against real TensorRT headers, as include/ and as
    JetPack's include/<triplet>/ layout under a /usr-like root."""
    for i, root in enumerate(os.environ["CVIG_TRT_HEADERS"].split(os.pathsep)):
        usr = tmp_path / f"usr{i}" / "include" / "x86_64-linux-gnu"
        usr.mkdir(parents=True)
        for h in (Path(root) / "include").glob("*.h"):
            (usr / h.name).symlink_to(h)
        for trt_root in (Path(root), tmp_path / f"usr{i}"):
            out = tmp_path / f"out{i}-{trt_root.name}"
            r = _cvig("build-plugins", "--cuda-archs", "87", "--trt-root", str(trt_root), "-o", str(out), "-j", "2",
                      env={"CVIG_HOME": str(home)})
            assert r.returncode == 0, r.stderr[-3000:]
            for name in locations.KINDS.values():
                assert (out / name).is_file(), name
            assert set(json.loads((home / "libraries.json").read_text())["libraries"]) == set(locations.KINDS)


def test_engines_of_the_plugin_graph_find_the_recorded_library(home, tmp_path):
    """cvig run/compare and open_session take the library build-plugins recorded, for plugin-graph engines only."""
    from clustervig.runtime.session import RuntimeErrorWithFix, open_session, plugin_library_for

    plan = tmp_path / "model_plugins.plan"
    plan.write_bytes(b"not an engine")
    (tmp_path / "model_plugins.json").write_text(json.dumps({"clustervig.plugins": '{"CvigKMeans": 4}'}))
    plain = tmp_path / "model_fp32.plan"
    plain.write_bytes(b"not an engine")
    (tmp_path / "model_fp32.json").write_text(json.dumps({"clustervig.precision": "fp32"}))
    assert plugin_library_for(plain) is None
    with pytest.raises(RuntimeErrorWithFix, match="engine of the plugin graph and needs libcvig_plugins.so: run "
                                                  "`cvig build-plugins`"):
        plugin_library_for(plan)
    lib = tmp_path / "libcvig_plugins.so"
    lib.write_bytes(b"x")
    locations.record({"plugins": str(lib)})
    assert plugin_library_for(plan) == lib.resolve()
    assert plugin_library_for(plan, tmp_path / "mine.so") == tmp_path / "mine.so"
    assert plugin_library_for(plain) is None  # a plain engine loads no plugin library
    if not importlib_has("tensorrt"):  # the session gets that far before it needs TensorRT itself
        with pytest.raises(RuntimeErrorWithFix, match="needs TensorRT and cuda-python"):
            open_session(plan)
