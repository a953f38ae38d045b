"""Plugin kernels: nvcc builds them for every default architecture; numpy references agree with the model."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import cuda_resources
from clustervig.graph import kmeans, knn_masked, l2_normalize, segment_mean, gather_max
from clustervig.plugins.reference import gather_max_rel_ref, kmeans_ref, partitioned_knn_ref, segment_mean_ref

from conftest import clustered_tokens

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
SYMBOLS = ["cvig_kmeans_launch", "cvig_kmeans_centroids_launch", "cvig_kmeans_smem_bytes", "cvig_partitioned_knn_launch",
           "cvig_segment_mean_launch", "cvig_gather_max_rel_launch"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for tool in ("cmake", "nvcc"):
        assert shutil.which(tool), f"{tool} is required to build the plugin kernels (CI installs it)"
    build = tmp_path_factory.mktemp("plugins-build")
    # One Release build for every default architecture, with ptxas' resource report on (-Xptxas=-v, each
    # command's output kept together): test_cuda_resources_of_every_kernel reads it from build.log.
    cfg, b = cuda_resources.cmake_build(build, jobs=2)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert b.returncode == 0, b.stdout + b.stderr
    (build / "build.log").write_text(b.stdout + b.stderr)
    return build, cfg.stdout


def test_kernels_build_for_every_default_arch(built):
    build, log = built
    lib = build / "libcvig_kernels.so"
    assert lib.is_file() and (build / "libcvig_kernels_host.so").is_file()  # one configure builds both
    archs = re.search(r"cvig: CUDA architectures (\S+)", log).group(1).split(";")
    nvcc = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True).stdout
    expected = [a for a in ["75", "80", "86", "87", "89", "90", "100", "110", "120"] if f"compute_{a}" in nvcc]
    assert archs == expected and "87" in archs  # Jetson Orin always
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    for s in SYMBOLS:
        assert re.search(rf"\bT {s}\b", syms), s
    # every architecture's code is embedded in the fat binary
    elf = subprocess.run(["cuobjdump", "--list-elf", str(lib)], capture_output=True, text=True) if shutil.which("cuobjdump") else None
    if elf is not None and elf.returncode == 0:
        for a in archs:
            assert f"sm_{a}" in elf.stdout


def test_cuda_resources_of_every_kernel(built):
    """ptxas' report of the build above (bench.cuda_resources): every kernel for every default
    architecture; no local-memory spills in the k-means and k-NN kernels (ACCEPTED_SPILLS: none);
    each kernel's largest launch within the architecture's register file and shared memory, the
    k-means kernel at every registered variant's DEGC shape. `pytest -s` prints the table."""
    build, log = built
    archs = cuda_resources.archs_of(log)
    records = cuda_resources.parse((build / "build.log").read_text())
    print(f"\nnvcc {cuda_resources.nvcc_version()}: registers per thread (spills, stack, static smem)\n"
          + cuda_resources.table(records, archs))
    want = {(f"{k}<{d}>", a) for k in cuda_resources.KERNELS for d in cuda_resources.DTYPES for a in archs}
    got = {(r.kernel, r.arch) for r in records}
    assert want <= got, sorted(want - got)
    assert len(records) == len(got)  # one record per kernel and architecture
    assert set(archs) <= set(cuda_resources.LIMITS)  # limits known for every default architecture
    spills = cuda_resources.unaccepted_spills(records)
    assert spills == [], ("local-memory spills (docs/design.md, 'Kernel resources per architecture'): "
                          + ", ".join(f"{r.kernel} {r.arch} {r.spill_stores}/{r.spill_loads} B" for r in spills))
    problems = cuda_resources.check(records)
    assert problems == [], "\n".join(problems)
    # the registers the k-means kernel's 1024-thread launch can have, on every architecture
    assert max(r.registers for r in records if r.base == "kmeans_kernel") <= 64
    # cvig_kmeans_smem_bytes of the C ABI (host build of the same configure) is the formula checked above
    lib = ctypes.CDLL(str(build / "libcvig_kernels_host.so"))
    lib.cvig_kmeans_smem_bytes.argtypes = [ctypes.c_int] * 3
    lib.cvig_kmeans_smem_bytes.restype = ctypes.c_size_t
    for s in cuda_resources.model_shapes():
        assert lib.cvig_kmeans_smem_bytes(s.n, s.c, s.clusters) == \
            cuda_resources.kmeans_smem_bytes(s.n, s.c, s.clusters)


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_reference_equals_model(seed):
    x, _ = clustered_tokens([70, 50, 40, 36], c=24, noise=0.3, seed=seed)
    xn = l2_normalize(torch.stack([x, x.flip(0)]))
    labels, counts = kmeans_ref(xn.numpy(), 4, 20)
    assert labels.dtype == np.int32 and counts.dtype == np.int32
    np.testing.assert_array_equal(labels, kmeans(xn, 4, 20).numpy())
    np.testing.assert_array_equal(counts, np.stack([np.bincount(l, minlength=4) for l in labels]))


def test_kmeans_reference_empty_cluster():
    xn = l2_normalize(torch.ones(1, 20, 4, dtype=torch.float64)).numpy()
    labels, counts = kmeans_ref(xn, 3, 5)
    assert (labels == 0).all() and counts.tolist() == [[20, 0, 0]]


@pytest.mark.parametrize("sizes", [[49, 49, 49, 49], [150, 40, 5, 1], [196, 0, 0, 0]])
def test_knn_reference_equals_model(sizes):
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)])
    rng.shuffle(labels)
    xn = l2_normalize(torch.randn(1, len(labels), 16, dtype=torch.float64))
    lt = torch.tensor(labels).unsqueeze(0)
    idx, valid = partitioned_knn_ref(xn.numpy(), lt.numpy().astype(np.int32), 9)
    ti, tv = knn_masked(xn, lt, 9)
    np.testing.assert_array_equal(idx, ti.numpy())
    np.testing.assert_array_equal(valid, tv.numpy().astype(np.int32))


def test_segment_ops_reference_equals_model():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 50))
    labels[1] = labels[1].clamp(max=1)  # image 1 has an empty partition 2
    z, counts = segment_mean_ref(x.numpy(), labels.numpy(), 3)
    tz, tc = segment_mean(x, labels, 3)
    np.testing.assert_allclose(z, tz.numpy(), atol=1e-12)
    np.testing.assert_array_equal(counts, tc.numpy().astype(np.int32))
    assert (z[1, 2] == 0).all()
    idx = torch.randint(0, 50, (2, 50, 7))
    np.testing.assert_array_equal(gather_max_rel_ref(x.numpy(), idx.numpy()), (gather_max(x, idx) - x).numpy())


TRT_ROOTS = [p for p in __import__("os").environ.get("CVIG_TRT_HEADERS", "").split(":") if p]


@pytest.mark.trt
@pytest.mark.skipif(not TRT_ROOTS, reason="set CVIG_TRT_HEADERS=<root>[:<root>] (dirs with include/NvInferRuntime.h, "
                    "e.g. extracted from NVIDIA/TensorRT tags v10.3.0 and v11.1) to compile-check the wrappers")
@pytest.mark.parametrize("root", TRT_ROOTS or ["-"])
def test_plugin_library_builds_against_tensorrt_headers(tmp_path, root):
    build = tmp_path / "b"
    cfg = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DCVIG_TRT_ROOT={root}",
                          "-DCVIG_CUDA_ARCHS=87"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "cvig_plugins"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr  # -Wall -Wextra -Werror on the wrappers
    syms = subprocess.run(["nm", "-D", "--defined-only", str(build / "libcvig_plugins.so")], capture_output=True, text=True).stdout
    assert re.search(r"\bT getCreators\b", syms) and re.search(r"\bT setLoggerFinder\b", syms)


@pytest.mark.trt
@pytest.mark.skipif(not TRT_ROOTS, reason="set CVIG_TRT_HEADERS=<root>[:<root>] (dirs with include/NvInferRuntime.h, "
                    "e.g. extracted from NVIDIA/TensorRT tags v10.3.0 and v11.1) to run the plugin harness")
@pytest.mark.parametrize("root", TRT_ROOTS or ["-"])
def test_plugin_harness_on_the_host(tmp_path, root):
    """Creators, attribute limits, output types vs supported formats, and dlopen registration of
    libcvig_plugins_autoreg.so (polygraphy --plugins), run on the host against a stand-in registry."""
    build = tmp_path / "b"
    cfg = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DCVIG_TRT_ROOT={root}",
                          "-DCVIG_CUDA_ARCHS=87"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build), "-j2", "--target", "cvig_plugins_autoreg"],
                       capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    version = (Path(root) / "include" / "NvInferVersion.h").read_text()
    major = re.search(r"#define (?:TRT_MAJOR_ENTERPRISE|NV_TENSORRT_MAJOR) (\d+)", version).group(1)
    cuda_inc = Path(shutil.which("nvcc")).resolve().parents[1] / "include"
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
             "-isystem", f"{root}/include", "-isystem", "/usr/local/cuda/include", "-isystem", str(cuda_inc)]
    fake = fake_dir / f"libnvinfer.so.{major}"
    for cmd in (["g++", *flags, "-shared", "-fPIC", str(PLUGINS / "tests" / "fake_nvinfer.cpp"), "-o", str(fake)],
                ["g++", *flags, str(PLUGINS / "tests" / "plugin_harness.cpp"), "-o", str(tmp_path / "harness"), "-ldl"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    cudart = [str(p) for p in (Path("/usr/local/cuda/lib64"), Path(shutil.which("nvcc")).resolve().parents[1] / "lib64")]
    env = {**__import__("os").environ, "LD_LIBRARY_PATH": ":".join([str(fake_dir), str(build), *cudart])}
    run = subprocess.run([str(tmp_path / "harness"), str(build / "libcvig_plugins.so"),
                          str(build / "libcvig_plugins_autoreg.so"), str(fake)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "autoreg registered the five creators on dlopen" in run.stdout and "checks passed" in run.stdout
