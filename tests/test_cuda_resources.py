"""bench.cuda_resources: the ptxas report parser and the launch-limit checker, on captured ptxas text.

The same parser and checker run on the real build of every default architecture in
tests/test_plugins_build.py (test_cuda_resources_of_every_kernel).
"""
from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from bench import cuda_resources as cr

# Real `nvcc -Xptxas=-v -O3 -fmad=false` output (nvcc V13.0.88) of plugins/knn/knn_kernel.cu for sm_90 and of
# plugins/kmeans/kmeans_kernel.cu for sm_75 (which reports cmem[0]; sm_90 and later do not).
KNN_SM90 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN46_GLOBAL__N__901fedea_13_knn_kernel_cu_f82e6ab110knn_kernelIN4cvig3f16EEEvPKT_PKiiiiiPiS8_' for 'sm_90'
ptxas info    : Function properties for _ZN46_GLOBAL__N__901fedea_13_knn_kernel_cu_f82e6ab110knn_kernelIN4cvig3f16EEEvPKT_PKiiiiiPiS8_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers
ptxas info    : Compile time = 34.853 ms
ptxas info    : Compiling entry function '_ZN46_GLOBAL__N__901fedea_13_knn_kernel_cu_f82e6ab110knn_kernelIfEEvPKT_PKiiiiiPiS6_' for 'sm_90'
ptxas info    : Function properties for _ZN46_GLOBAL__N__901fedea_13_knn_kernel_cu_f82e6ab110knn_kernelIfEEvPKT_PKiiiiiPiS6_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 47 registers, used 0 barriers
ptxas info    : Compile time = 22.900 ms
"""
KMEANS_SM75 = """\
[ 25%] Building CUDA object CMakeFiles/cvig_kernels.dir/kmeans/kmeans_kernel.cu.o
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN49_GLOBAL__N__432241ab_16_kmeans_kernel_cu_52e07aa813kmeans_kernelIN4cvig3f16EEEvPKT_iiiiiPiS6_PS3_' for 'sm_75'
ptxas info    : Function properties for _ZN49_GLOBAL__N__432241ab_16_kmeans_kernel_cu_52e07aa813kmeans_kernelIN4cvig3f16EEEvPKT_iiiiiPiS6_PS3_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 54 registers, used 1 barriers, 408 bytes cmem[0]
ptxas info    : Compile time = 102.465 ms
"""
# The k-means kernel for sm_100 as plugins/kmeans/kmeans_kernel.cu had it with __launch_bounds__(1024) alone:
# ptxas aimed at two blocks per SM (32 registers) and spilled.
KMEANS_SM100_SPILL = """\
ptxas info    : Compiling entry function '_ZN49_GLOBAL__N__432241ab_16_kmeans_kernel_cu_52e07aa813kmeans_kernelIfEEvPKT_iiiiiPiS4_PS1_' for 'sm_100'
ptxas info    : Function properties for _ZN49_GLOBAL__N__432241ab_16_kmeans_kernel_cu_52e07aa813kmeans_kernelIfEEvPKT_iiiiiPiS4_PS1_
    32 bytes stack frame, 32 bytes spill stores, 76 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 32 bytes cumulative stack size
ptxas info    : Compile time = 66.573 ms
"""
# Test kernels (not the project's) for sm_86, -maxrregcount=32: a local array, static shared memory, a spill.
SYNTHETIC_SM86 = """\
ptxas info    : Overriding maximum register limit 256 for '_Z2lmPfii' with  32 of maxrregcount option
ptxas info    : 16 bytes gmem, 32 bytes cmem[3], 8 bytes cmem[4]
ptxas info    : Compiling entry function '_Z2spPdi' for 'sm_86'
ptxas info    : Function properties for _Z2spPdi
    336 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 336 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compile time = 16.804 ms
ptxas info    : Compiling entry function '_Z2lmPfii' for 'sm_86'
ptxas info    : Function properties for _Z2lmPfii
    256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 256 bytes cumulative stack size, 400 bytes smem, 368 bytes cmem[0]
ptxas info    : Compile time = 8.068 ms
"""
# Separate compilation (-rdc=true, sm_87): a non-inlined device function has properties but is no entry,
# and a template kernel with a literal argument.
RDC_SM87 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for _Z1fPfi$1
    72 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 4.632 ms
ptxas info    : Compiling entry function '_Z2tkIdLin3EEvPT_' for 'sm_87'
ptxas info    : Function properties for _Z2tkIdLin3EEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 0.877 ms
ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_87'
ptxas info    : Function properties for _Z1kPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 364 bytes cmem[0]
ptxas info    : Compile time = 0.899 ms
ptxas info    : Function properties for _Z1fPfi
    72 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compile time = 1.606 ms
"""


def test_parse_project_kernels():
    knn = cr.parse(KNN_SM90)
    assert [(r.kernel, r.arch, r.registers) for r in knn] == [("knn_kernel<f16>", "sm_90", 48),
                                                               ("knn_kernel<float>", "sm_90", 47)]
    assert all(r.spill_stores == r.spill_loads == r.stack_frame == r.local == r.smem == r.cmem == 0 for r in knn)
    assert knn[0].base == "knn_kernel" and knn[0].barriers == 0 and not knn[0].spills
    (km,) = cr.parse(KMEANS_SM75)
    assert (km.kernel, km.arch, km.registers, km.barriers, km.cmem) == ("kmeans_kernel<f16>", "sm_75", 54, 1, 408)
    assert km.mangled.startswith("_ZN49_GLOBAL__N__") and km.mangled.endswith("PS3_")
    (sp,) = cr.parse(KMEANS_SM100_SPILL)
    assert (sp.kernel, sp.arch, sp.registers) == ("kmeans_kernel<float>", "sm_100", 32)
    assert (sp.spill_stores, sp.spill_loads, sp.stack_frame, sp.local) == (32, 76, 32, 32) and sp.spills


def test_parse_spills_smem_and_local_memory():
    spill, local = cr.parse(SYNTHETIC_SM86)
    assert (spill.kernel, spill.registers, spill.spill_stores, spill.spill_loads, spill.local) \
        == ("sp", 64, 16, 16, 336)
    assert (local.kernel, local.registers, local.smem, local.local, local.cmem) == ("lm", 32, 400, 256, 368)
    assert local.stack_frame == 256 and not local.spills


def test_parse_skips_device_functions_and_duplicates():
    tk, k = cr.parse(RDC_SM87 + RDC_SM87)  # the same object twice: kept once
    assert (tk.kernel, tk.registers) == ("tk<double, -3>", 8)
    assert (k.kernel, k.registers, k.stack_frame) == ("k", 24, 0)  # not the 72 B of f, which is no entry


def test_parse_older_ptxas_fields():
    # hand-written in the format of older ptxas releases (no barriers, lmem): every field is optional
    text = ("ptxas info    : Compiling entry function '_Z1kPfi' for 'sm_75'\n"
            "ptxas info    : Used 20 registers, 16 bytes smem, 348 bytes cmem[0], 8 bytes lmem\n")
    (r,) = cr.parse(text)
    assert (r.registers, r.smem, r.cmem, r.local, r.stack_frame, r.barriers) == (20, 16, 348, 8, 0, 0)


def test_demangle():
    ns = "_ZN51_GLOBAL__N__9f916fd5_18_segment_kernels_cu_0100248e"
    assert cr.demangle(ns + "19segment_mean_kernelIfEEvPKT_PKiiiiiPS1_Pi") == "segment_mean_kernel<float>"
    assert cr.demangle(ns + "21gather_max_rel_kernelIN4cvig3f16EEEvPKT_PKiiiiiPS3_") == "gather_max_rel_kernel<f16>"
    assert cr.demangle("_ZN4cvig3fooEv") == "foo"
    assert cr.demangle("not_mangled") == "not_mangled"
    assert cr.demangle("_ZN12broken") == "_ZN12broken"  # malformed: returned as given


def record(kernel="kmeans_kernel<float>", arch="sm_87", registers=64, **kw):
    base = dict(kernel=kernel, arch=arch, registers=registers, spill_stores=0, spill_loads=0, stack_frame=0,
                smem=0, local=0, barriers=1, cmem=0, mangled="_Z" + kernel)
    base.update(kw)
    return cr.KernelResources(**base)


SHAPES = [cr.Shape("b_hr", 784, 640, 6, 18)]


def test_checker_accepts_a_fitting_kernel():
    assert cr.check([record(), record("knn_kernel<f16>", registers=62), record("segment_mean_kernel<float>")],
                    SHAPES) == []


def test_checker_catches_register_and_thread_limits():
    # 1024 threads x 65 registers: 72 allocated per thread (8-register steps per warp) -> 73728 > 65536
    (p,) = cr.check([record(registers=65)], SHAPES)
    assert "1024 threads x 65 registers = 73728 allocated > 65536" in p
    assert cr.registers_per_block(65, 1024, cr.LIMITS["sm_90"]) == (73728, 73728)
    # the hardware's check rounds warps up to the 4 sub-partitions: 5 warps x 255 regs -> 8 x 8192
    assert cr.registers_per_block(255, 160, cr.LIMITS["sm_90"]) == (40960, 65536)
    assert any("256 registers > 255" in p for p in cr.check([record("knn_kernel<float>", registers=256)], SHAPES))


def test_checker_catches_spills_unless_accepted():
    spilled = record(registers=32, spill_stores=20, spill_loads=36, stack_frame=16, local=16)
    (p,) = cr.check([spilled], SHAPES)
    assert p.startswith("kmeans_kernel<float> on sm_87: spills 20 B stored / 36 B loaded")
    assert cr.check([spilled], SHAPES, accepted={("kmeans_kernel<float>", "sm_87"): "why"}) == []
    assert cr.check([spilled], SHAPES, accepted={("kmeans_kernel", "sm_87"): "why"}) == []
    assert len(cr.check([spilled], SHAPES, accepted={("kmeans_kernel", "sm_90"): "why"})) == 1  # exactly there
    # the segment kernels may spill (not among NO_SPILL)
    assert cr.check([replace(spilled, kernel="gather_max_rel_kernel<f16>")], SHAPES) == []


def test_checker_catches_shared_memory_over_the_limit():
    # 99 KiB < working set <= 163 KiB: too large for sm_86/sm_89/sm_120 and sm_75, fits sm_80/sm_87/sm_90...
    mid = cr.Shape("mid", 4096, 4096, 6, 9)
    need = cr.kmeans_smem_bytes(4096, 4096, 6)
    assert 99 * 1024 < need <= 163 * 1024
    recs = {a: record(arch=a) for a in cr.LIMITS}
    over = {a for a, r in recs.items() if cr.check([r], [mid])}
    assert over == {"sm_75", "sm_86", "sm_89", "sm_120", "sm_121"}
    (p,) = cr.check([recs["sm_86"]], [mid])
    assert p == (f"kmeans_kernel<float> on sm_86 for mid: 0 B static + {need} B dynamic shared memory "
                 f"> {99 * 1024} B per block")
    # static shared memory counts too
    assert cr.check([record(arch="sm_87", smem=163 * 1024 - need + 1)], [mid])
    assert not cr.check([record(arch="sm_87", smem=163 * 1024 - need)], [mid])
    # the k-NN kernel does not opt in: 48 KiB with its static shared memory
    assert cr.check([record("knn_kernel<float>", arch="sm_90", smem=48 * 1024 - cr.knn_smem_bytes() + 1)], SHAPES)
    assert not cr.check([record("knn_kernel<float>", arch="sm_90", smem=48 * 1024 - cr.knn_smem_bytes())], SHAPES)
    assert cr.smem_fit([mid], ["sm_86", "sm_87"])[0]["too_large_for"] == ["sm_86"]


def test_checker_needs_limits_for_every_arch():
    (p,) = cr.check([record(arch="sm_999")], SHAPES)
    assert "no limits known for sm_999" in p


def test_published_variants_fit_every_arch():
    shapes = cr.model_shapes()
    assert {s.name for s in shapes} >= {"cvig_ti", "cvig_s", "cvig_b", "cvig_b_hr", "cvig_nano"}
    assert all(s.k_max <= cr.CVIG_MAX_K for s in shapes)
    rows = cr.smem_fit(shapes, list(cr.LIMITS))
    assert [r for r in rows if r["too_large_for"]] == []
    assert {r["name"]: r["bytes"] for r in rows}["cvig_b_hr"] == 21704


def test_limits_agree_with_trt_compat():
    from clustervig.export.trt_compat import SMEM_OPTIN_LIMITS

    for arch, limit in SMEM_OPTIN_LIMITS.items():
        assert cr.LIMITS[arch].smem_optin == limit, arch
    for arch, lim in cr.LIMITS.items():  # 1 KiB per block reserved from sm_80 on
        assert lim.smem_per_sm - lim.smem_optin == (0 if arch == "sm_75" else 1024), arch


def test_report_markdown():
    recs = [record("kmeans_kernel<f16>", arch="sm_90", registers=32, spill_stores=20, spill_loads=36, stack_frame=16,
                   local=16), record("kmeans_kernel<f16>", arch="sm_87", registers=58)]
    md = cr.table(recs, ["sm_87", "sm_90"])
    assert "| `kmeans_kernel<f16>` (1024 threads) | 58 | 32 (spill 20/36 B, stack 16 B) |" in md
    assert "| `knn_kernel<float>` (128 threads) | — | — |" in md  # absent kernels show as such
    res = {"date": "d", "nvcc": "nvcc V0", "archs": ["sm_87", "sm_90"],
           "records": [asdict(r) for r in recs], "variants": cr.smem_fit(SHAPES, ["sm_87"]),
           "problems": cr.check(recs, SHAPES)}
    text = cr.report(res)
    assert "nvcc V0" in text and "| b_hr | 784 | 640 | 6 | 21704 (21.2 KiB) | none |" in text
    assert "Checks: kmeans_kernel<f16> on sm_90: spills" in text


def test_update_section_of_another_file(tmp_path):
    import bench.common as common

    doc = tmp_path / "design.md"
    doc.write_text("# D\n\ntext\n<!-- bench:x -->\nold\n<!-- /bench:x -->\n\nafter\n")
    common.update_section("x", "new", path=doc)
    assert doc.read_text() == "# D\n\ntext\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\n\nafter\n"


@pytest.mark.parametrize("kernel", cr.KERNELS)
def test_every_kernel_has_a_launch(kernel):
    launch = cr.LAUNCHES[kernel]
    assert 32 <= launch.threads <= 1024 and launch.threads % 32 == 0


def test_cli_on_a_saved_log(tmp_path, capsys):
    log = tmp_path / "build.log"
    log.write_text(KNN_SM90 + KMEANS_SM100_SPILL)
    doc = tmp_path / "design.md"
    doc.write_text("# D\n")
    rc = cr.main(["--log", str(log), "--results", str(tmp_path / "r"), "--markdown", str(tmp_path / "B.md"),
                  "--docs", str(doc)])
    assert rc == 1  # the k-means spill on sm_100
    res = __import__("json").loads((tmp_path / "r" / "cuda_resources.json").read_text())
    assert res["archs"] == ["sm_90", "sm_100"] and len(res["records"]) == 3
    assert res["problems"] == ["kmeans_kernel<float> on sm_100: spills 32 B stored / 76 B loaded to local memory "
                               "(32 registers, 32 B stack frame)"]
    assert "## CUDA kernels: registers" in (tmp_path / "B.md").read_text()
    assert "<!-- bench:cuda-resources -->" in doc.read_text() and "32 (spill 32/76 B" in doc.read_text()
    import bench.common as common
    assert common.RESULTS == common.ROOT / "bench" / "results"  # configure() restored
