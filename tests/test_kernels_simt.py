"""The kernels' CUDA device code on the SIMT executor (tests/simt_executor.py, plugins/tests/simt/).

The host build runs the kernels' per-element math through a serial executor, which cannot show what
goes wrong between threads. Here the ``.cu`` sources and ``cvig_cuda.cuh`` (the device path) run with one
fiber per CUDA thread, CUDA's barrier and warp-collective semantics, checked shared memory, and the
order of lanes and warps varied at every barrier and collective. Two kinds of test:

* the executor itself: planted defects (divergent barrier, skipped collective, exited partner, read of
  unwritten shared memory, access past the dynamic shared memory, a race, > 48 KiB without the
  opt-in) are each reported; the k-NN insertion as it was before its fix is reported; the
  collectives compute what CUDA's do (against numpy);
* the kernel matrix of tests/test_kernels_host.py (its case tables and adversarial tests) under every
  schedule and both k-means block widths, each launch bit-identical to the host build
  (``TwinLibrary`` runs both and compares every output byte) and free of reports.

Sizes: the host matrix's N = 3136 and 784 x 640 cases take minutes on the executor (about 50 ns per
lane per collective), so they run here at N = 1100 (more tokens than the widest block's threads, so
every warp loops), which exercises the same code paths.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

import test_kernels_host as H
from clustervig.plugins import kernels as K
from clustervig.plugins.reference import partitioned_knn_ref
from simt_executor import SCHEDULES, Executor, SimtDefect, TwinLibrary, build_kernels, build_planted, resolve_report

# (schedule, SM count): 132 SMs make every test batch launch k-means with 1024-thread blocks, 1 SM with 256
RUNS = [("ascending", 132), ("ascending", 1), ("descending", 132), ("descending", 1),
        ("random:1", 1), ("random:2", 132), ("random:3", 1)]
# one run per schedule, for the costliest cases
RUNS_EACH = [("ascending", 132), ("descending", 1), ("random:1", 1), ("random:2", 132), ("random:3", 1)]
assert {s for s, _ in RUNS} == {s for s, _ in RUNS_EACH} == set(SCHEDULES)


@pytest.fixture(scope="module")
def twin():
    lib = TwinLibrary(build_kernels(), K.host_library())
    assert lib.backend == "simt"
    yield lib
    lib.executor.configure()


@pytest.fixture(scope="module")
def planted():
    path = build_planted()
    cdll = ctypes.CDLL(str(path))
    ex = Executor(cdll)
    yield cdll, ex, path
    ex.configure()


def each_run(lib: TwinLibrary, fn, runs=RUNS):
    """fn() under every schedule and block width; every launch is compared with the host build."""
    for schedule, sms in runs:
        lib.executor.configure(schedule, sms=sms)
        before = lib.compared
        try:
            fn()
        except (AssertionError, SimtDefect) as exc:
            raise AssertionError(f"schedule {schedule}, {sms} SMs: {resolve_report(str(exc), lib.path)}") from None
        assert lib.compared > before, "no launch was compared with the host build"


def simt_size(n: int) -> int:
    return min(n, 1100)


# ----------------------------------------------------------------------------
# The kernel matrix of tests/test_kernels_host.py, bit-identical to the host build under every schedule
# ----------------------------------------------------------------------------


def test_backend_is_named(twin):
    assert twin.backend == "simt" and twin.host.backend == "host"
    assert twin.executor.context_switch() in ("x86-64 assembly", "ucontext")


@pytest.mark.parametrize("b,n,c,k,seed", H.KMEANS_RANDOM)
def test_kmeans_matrix(twin, b, n, c, k, seed):
    x = H.random_tokens(b, simt_size(n), c, seed)
    each_run(twin, lambda: K.kmeans(x, k, 20, lib=twin), RUNS_EACH if n > 500 else RUNS)


@pytest.mark.parametrize("b,n,c,k,iters,seed", H.KMEANS_CENTROIDS)
@pytest.mark.parametrize("empty_zero", [True, False])
def test_kmeans_centroids_matrix(twin, b, n, c, k, iters, seed, empty_zero):
    x = H.centred(b, n, c, seed, scale=3.0)
    each_run(twin, lambda: K.kmeans_centroids(x, k, iters, empty_zero, lib=twin), RUNS_EACH if n > 500 else RUNS)


@pytest.mark.parametrize("sizes,k", H.KNN_SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_knn_matrix(twin, sizes, k, dtype):
    x, labels = H.knn_case(sizes, dtype)
    each_run(twin, lambda: K.partitioned_knn(x, labels, k, lib=twin))


@pytest.mark.parametrize("n,c,kappa", [(1100, 32, 8), (784, 64, 6)])
def test_knn_large(twin, n, c, kappa):
    x = H.random_tokens(1, n, c, 6)
    labels, _ = K.kmeans(x, kappa, 5, lib=twin.host)
    each_run(twin, lambda: K.partitioned_knn(x, labels, 18, lib=twin), RUNS_EACH)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,n,c,k", H.SEGMENT_SHAPES)
def test_segment_mean_matrix(twin, dtype, b, n, c, k):
    x, labels = H.segment_case(b, simt_size(n), c, k, dtype)
    each_run(twin, lambda: K.segment_mean(x, labels, k, lib=twin))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("b,n,c,k", H.GATHER_SHAPES)
def test_gather_max_rel_matrix(twin, dtype, b, n, c, k):
    x, idx = H.gather_case(b, simt_size(n), c, k, dtype)
    each_run(twin, lambda: K.gather_max_rel(x, idx, lib=twin))


# the adversarial tests of the host file, as they are: each asserts against the references, and the twin
# library makes every launch in them bit-identical to the host build
ADVERSARIAL = [
    "test_kmeans_identical_tokens_ties_every_step", "test_kmeans_duplicate_groups_and_empty_clusters",
    "test_kmeans_fp16_inputs", "test_kmeans_centroids_empty_cluster_rules", "test_kmeans_centroids_match_the_model",
    "test_kmeans_centroids_fp16", "test_knn_k1_is_the_token_itself", "test_knn_k_at_least_partition_size",
    "test_knn_ties_go_to_lower_index", "test_half_conversion_every_value", "test_half_rounding_is_nearest_even",
]


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_cases(twin, name):
    each_run(twin, lambda: getattr(H, name)(twin))


@pytest.mark.parametrize("seed", range(3))
def test_kmeans_clustered_tokens(twin, seed):
    each_run(twin, lambda: H.test_kmeans_clustered_tokens(twin, seed))


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_kmeans_iteration_count(twin, iters):
    each_run(twin, lambda: H.test_kmeans_iteration_count(twin, iters))


def test_status_codes(twin):
    # the raw C ABI of the SIMT build: the same status for every bad call as the host build
    twin.executor.configure("ascending")
    H.test_status_codes(twin)
    H.test_kmeans_centroids_status_codes(twin)
    with pytest.raises(K.KernelLibraryError, match="unsupported size"):
        K.kmeans(np.zeros((1, 60000, 1024), np.float32), 8, 1, lib=twin)
    assert twin.executor.report() == ""


def test_kmeans_above_48k_opts_in_and_fits_the_device(twin):
    # a working set over 48 KiB runs only after cudaFuncSetAttribute, which the launcher calls; a device whose
    # opt-in maximum is below the working set is refused with status 2 before any launch
    n, c, k = 5000, 640, 8
    need = twin.kmeans_smem_bytes(n, c, k)
    assert 48 * 1024 < need < 227 * 1024
    x = H.random_tokens(1, n, c, 1)
    twin.executor.reset_attributes()
    each_run(twin, lambda: K.kmeans(x, k, 1, lib=twin), [("random:1", 1)])
    twin.executor.configure("ascending", smem_optin=need - 4)
    f = twin.lib
    lab, cnt = np.zeros((1, n), np.int32), np.zeros((1, k), np.int32)
    assert f.cvig_kmeans_launch(x.ctypes.data, 0, 1, n, c, k, 1, lab.ctypes.data, cnt.ctypes.data, None) == 2
    twin.executor.configure("ascending")


def test_block_order_and_width_do_not_change_results(twin):
    # one k-means batch at both block widths and a k-NN batch of many blocks, ascending and random block order
    x = H.random_tokens(6, 196, 32, 9)
    each_run(twin, lambda: K.partitioned_knn(x, K.kmeans(x, 4, 20, lib=twin)[0], 9, lib=twin))


# ----------------------------------------------------------------------------
# The k-NN race (fixed in plugins/knn/knn_impl.h): the insertion as it was is reported, the fixed one is clean
# ----------------------------------------------------------------------------


def grid_tokens(seed, b=2, n=37, c=3, kappa=5):
    """Tokens on an integer grid, so many similarities tie (the smallest case that failed: B=2, N=37, C=3, K=2)."""
    r = np.random.default_rng(seed)
    return r.integers(-2, 3, (b, n, c)).astype(np.float16), r.integers(0, kappa, (b, n)).astype(np.int32)


def run_unfixed(cdll, ex, x, labels, k, schedule, races):
    b, n, c = x.shape
    idx, valid = np.zeros((b, n, k), np.int32), np.zeros((b, n, k), np.int32)
    ex.configure(schedule, races=races)
    ex.clear()
    code = cdll.planted_knn_unfixed(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(labels.ctypes.data), 1, b, n, c, k,
                                    ctypes.c_void_p(idx.ctypes.data), ctypes.c_void_p(valid.ctypes.data))
    return code, ex.report(), idx, valid


def test_unfixed_knn_insertion_is_reported(planted, twin):
    cdll, ex, _ = planted
    x, labels = grid_tokens(0)
    ref = partitioned_knn_ref(x.astype(np.float32), labels, 2)
    # with the race check: a read of best[K-1] that lane 0 rewrote without a __syncwarp, under every schedule
    for schedule in SCHEDULES:
        code, report, _, _ = run_unfixed(cdll, ex, x, labels, 2, schedule, races=True)
        assert code != 0 and re.match(r"race \((read after write|write after read)\)", report), (schedule, report)
    # without it: lanes that read lane 0's new list skip the __syncwarp and meet lane 0 at another collective
    # (ascending lanes); descending lanes read before lane 0 writes, and the result is right by luck
    code, report, _, _ = run_unfixed(cdll, ex, x, labels, 2, "ascending", races=False)
    assert code != 0 and re.match(r"(divergence|deadlock): ", report), report
    code, report, idx, valid = run_unfixed(cdll, ex, x, labels, 2, "descending", races=False)
    assert code == 0 and report == ""
    np.testing.assert_array_equal(idx, ref[0])
    # the library's fixed kernel: clean and bit-identical on the same inputs under every schedule
    each_run(twin, lambda: np.testing.assert_array_equal(K.partitioned_knn(x, labels, 2, lib=twin)[0], ref[0]))


@pytest.mark.parametrize("seed", range(6))
def test_fixed_knn_on_tied_grids(twin, seed):
    x, labels = grid_tokens(seed, b=2, n=37 + 13 * seed, c=3 + seed % 3, kappa=5)
    k = 2 + 3 * seed
    ref_i, ref_v = partitioned_knn_ref(x.astype(np.float32), labels, k)

    def check():
        idx, valid = K.partitioned_knn(x, labels, k, lib=twin)
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(valid, ref_v)

    each_run(twin, check)


# ----------------------------------------------------------------------------
# The executor itself
# ----------------------------------------------------------------------------


def _call(cdll, ex, name, *args, schedule="ascending", races=True, smem_optin=227 * 1024):
    ex.configure(schedule, races=races, smem_optin=smem_optin)
    ex.clear()
    conv = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else a for a in args]
    return getattr(cdll, name)(*conv), ex.report()


PLANTED = [  # entry point, arguments, what the report must say
    ("planted_divergent_syncthreads", lambda: (np.zeros(64, np.int32),),
     r"divergence: threads of block 0 wait at different __syncthreads: .* planted_kernels\.cu:\d+, thread 40 .*"
     r"planted_kernels\.cu:\d+"),
    ("planted_skipped_collective", lambda: (np.zeros(32, np.float32),),
     r"divergence: lanes of warp 0 \(block 0\) wait at different barriers or collectives: lane 0: __shfl_down_sync"
     r"\(mask 0xffffffff\) at planted_kernels\.cu:\d+; lane 1: __shfl_sync"),
    ("planted_exited_partner", lambda: (np.zeros(64, np.float32),),
     r"deadlock: thread 0 .* waits at __syncwarp\(mask 0xffffffff\) .* names lane 1, but that lane has exited"),
    ("planted_read_before_write", lambda: (np.zeros(64, np.float32), 64),
     r"read of uninitialized shared memory: thread \d+ .* reads 4 bytes at offset (\d+) that no thread"),
    ("planted_out_of_bounds", lambda: (np.zeros(64, np.float32), 64),
     r"out-of-bounds shared memory access: thread 63 \(block 0, warp 1, lane 31\) reads 4 bytes at offset 256 of "
     r"the launch's 256 bytes"),
    ("planted_race", lambda: (np.zeros(64, np.float32), 64),
     r"race \((read after write|write after read)\): .* shared offset 4 "),
    ("planted_big_smem", lambda: (np.zeros(1, np.float32), 20000, 0),
     r"invalid launch: 80000 bytes of dynamic shared memory, above the kernel's limit of 49152 bytes .*"
     r"cudaFuncSetAttribute"),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name,args,pattern", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_defect_is_reported(planted, schedule, name, args, pattern):
    cdll, ex, path = planted
    ex.reset_attributes()
    code, report = _call(cdll, ex, name, *args(), schedule=schedule)
    assert code != 0, f"{name} ran without an error under {schedule}"
    assert re.search(pattern, report), report
    if "+0x" in report:  # a code address: it resolves to the kernel's source line
        resolved = resolve_report(report, path)
        assert "planted_kernels.cu" in resolved, resolved
    ex.clear()


def test_read_before_write_names_unwritten_bytes_only(planted):
    cdll, ex, _ = planted
    for schedule in SCHEDULES:
        _, report = _call(cdll, ex, "planted_read_before_write", np.zeros(64, np.float32), 64, schedule=schedule)
        off = int(re.search(r"at offset (\d+)", report).group(1))
        assert 256 <= off < 512 and off % 4 == 0  # the second half, s[n + t], which nobody wrote


def test_big_smem_runs_after_the_opt_in(planted):
    cdll, ex, _ = planted
    out = np.zeros(1, np.float32)
    ex.reset_attributes()
    code, report = _call(cdll, ex, "planted_big_smem", out, 20000, 1)
    assert (code, report) == (0, "") and out[0] == 19999.0
    # once opted in, later launches of that kernel may use it (the attribute stays, as on a GPU)
    assert _call(cdll, ex, "planted_big_smem", out, 20000, 0) == (0, "")
    # above the device's opt-in maximum, cudaFuncSetAttribute itself fails
    ex.reset_attributes()
    code, _ = _call(cdll, ex, "planted_big_smem", out, 20000, 1, smem_optin=64 * 1024)
    assert code == 1  # cudaErrorInvalidValue


def test_race_without_the_check_shows_as_a_difference(planted):
    # the schedules are what make a race visible without the race check: thread 0 rewrites s[1] while
    # the others read it; ascending lanes see 100 (thread 0 ran first), descending lanes see 1
    cdll, ex, _ = planted
    outs = {}
    for schedule in SCHEDULES:
        out = np.zeros(64, np.float32)
        assert _call(cdll, ex, "planted_race", out, 64, schedule=schedule, races=False) == (0, "")
        outs[schedule] = out
    assert (outs["ascending"][1:] == 100).all() and (outs["descending"][1:] == 1).all()
    assert outs["ascending"][0] == outs["descending"][0] == 100  # thread 0 reads its own write
    assert len({o.tobytes() for o in outs.values()}) >= 3  # the seeded permutations mix the two


def collectives_reference(v: np.ndarray) -> np.ndarray:
    """What CUDA's collectives return for collectives_kernel (planted_kernels.cu), in numpy."""
    t = v.size
    out = np.zeros((t, 8), np.float64)
    for w0 in range(0, t, 32):
        vw = v[w0:w0 + 32].astype(np.float64)
        lane = np.arange(32)
        big = vw > 0.5
        ballot = int(sum(1 << int(i) for i in np.flatnonzero(big)))
        low = int(sum(1 << int(i) for i in np.flatnonzero(big[:16])))
        out[w0:w0 + 32, 0] = vw[(lane * 7 + 3) % 32]
        out[w0:w0 + 32, 1] = np.where(lane + 5 < 32, vw[np.minimum(lane + 5, 31)], vw)
        out[w0:w0 + 32, 2] = vw[(lane // 8) * 8 + 2]
        seg = lane % 16
        out[w0:w0 + 32, 3] = np.where(seg + 3 < 16, vw[np.minimum(lane + 3, 31)], vw)
        out[w0:w0 + 32, 4] = ballot & 0xFFFFFF
        out[w0:w0 + 32, 5] = np.where(lane < 16, low, vw[31])
        # out[:, 6], the shared-memory sum, is checked by the test itself
        # warp_dot's tree: lane l's partial is v_l * v_l; then halves 16, 8, 4, 2, 1 in float32
        p = vw.astype(np.float32) * vw.astype(np.float32)
        for off in (16, 8, 4, 2, 1):
            p[:off] = p[:off] + p[off:2 * off]
        out[w0:w0 + 32, 7] = p[0]
    return out


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_collectives_compute_what_cuda_does(planted, schedule):
    cdll, ex, _ = planted
    blocks, threads = 3, 96
    v = np.random.default_rng(5).random(blocks * threads).astype(np.float32)
    out = np.zeros((blocks * threads, 8), np.float32)
    assert _call(cdll, ex, "planted_collectives", v, out, blocks, threads, schedule=schedule) == (0, "")
    ref = collectives_reference(v)
    np.testing.assert_array_equal(out[:, :6], ref[:, :6].astype(np.float32))
    # the shared-memory sum runs in index order in float32: exactly numpy's sequential float32 sum
    seq = np.array([np.float32(0)] * (blocks * threads))
    for i in range(0, blocks * threads, 32):
        s = np.float32(0)
        for x in v[i:i + 32]:
            s = np.float32(s + x)
        seq[i:i + 32] = s
    np.testing.assert_array_equal(out[:, 6], seq)
    np.testing.assert_array_equal(out[:, 7], ref[:, 7].astype(np.float32))


def test_ucontext_switching_matches(tmp_path, monkeypatch):
    # the portable context switch (used where the x86-64 assembly is not) runs the same semantics
    from simt_executor import build

    path = build("cvig_simt_planted_ucontext", ["tests/simt/planted_kernels.cu"], defines=("-DCVIG_SIMT_UCONTEXT",))
    cdll = ctypes.CDLL(str(path))
    ex = Executor(cdll)
    assert ex.context_switch() == "ucontext"
    v = np.random.default_rng(6).random(64).astype(np.float32)
    out = np.zeros((64, 8), np.float32)
    assert _call(cdll, ex, "planted_collectives", v, out, 1, 64, schedule="random:7") == (0, "")
    np.testing.assert_array_equal(out[:, :6], collectives_reference(v)[:, :6].astype(np.float32))
    code, report = _call(cdll, ex, "planted_skipped_collective", np.zeros(32, np.float32))
    assert code != 0 and report.startswith("divergence: ")


def test_rewrite_refuses_what_it_cannot_parse():
    from simt_executor import SimtBuildError, rewrite_cu

    src = "extern __shared__ float s[];\nk<T><<<g, b, sm, st>>>(x, y);\n"
    out = rewrite_cu(src)
    assert "::cvig_simt::kernel_launch(k<T>, g, b, sm, st)(x, y);" in out
    assert "float* const s = static_cast<float*>(::cvig_simt::dynamic_shared());" in out
    with pytest.raises(SimtBuildError, match="'<<<'"):
        rewrite_cu("(f)<<<1, 2>>>(x);")
