"""python -m bench.backbone on a tiny size (cvig_nano at 96 x 160): the rows it writes agree with the export's
own report and with the graphs, and the BENCHMARKS.md section says what was measured."""
from __future__ import annotations

import json

import pytest

import clustervig

from bench import backbone, common


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    assert backbone.main(["--model", "cvig_nano", "--sizes", "96x160", "--repeats", "2", "--results", str(d),
                          "--markdown", str(d / "BENCHMARKS.md")]) == 0
    assert common.RESULTS != d  # the published paths are restored
    return json.loads((d / "backbone_cpu.json").read_text()), (d / "BENCHMARKS.md").read_text()


def test_rows_of_one_size(result):
    res, _ = result
    (s,) = res["sizes"]
    assert s["img_size"] == [96, 160] and s["tokens"] == 60
    assert set(s["latency"]) == {"cvig-padded-auto", "cvig-padded-balanced", "cvig-masked", "vig"}
    for name, r in s["latency"].items():
        assert r["n"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["finite"], name
        assert r["peak_rss"] >= r["rss_after_load"] > 0
    cap = s["capacity"]
    # auto: 1.25 x the largest partition, at most N, and no overflow on the images it was measured on
    assert cap["capacity"] == min(60, -(-5 * cap["largest_partition"] // 4))
    assert all(v["overflow_at_capacity"] == 0 for v in cap["sets"].values())
    # balanced: ceil(1.25 N / kappa) = ceil(1.25 * 60 / 4) = 19, its overflow a share of the photographs' slots
    bal = s["balanced"]
    assert bal["capacity"] == 19 and bal["clusters"] == 4 and 0 <= bal["overflow_fraction"] <= 1
    blocks = clustervig.get_config("cvig_nano").depth
    assert bal["overflow_tokens"] == round(bal["overflow_fraction"] * bal["images"] * 60 * blocks)
    assert [o["name"] for o in s["outputs"]] == ["p3", "p4", "p5", "p6"]
    fp32 = s["fidelity"]["photos"]["fp32 vs pytorch"]
    assert fp32["cosine_min"] > 0.9999 and fp32["label_agreement"] == 1.0
    assert set(fp32["outputs"]) == {"p3", "p4", "p5", "p6"}
    assert "fp16-emulated vs fp32" in s["fidelity"]["random"]
    # the padded graph's largest k-NN tensor is a [1, kappa, P, P]-sized or smaller one; the masked one's [1, N, N]
    masked = s["tensorrt"]["masked"]["knn_largest"][0]
    assert masked["shape"][-2:] == [60, 60] or masked["bytes"] >= 60 * 60 * 4
    assert s["tensorrt"]["plugins"]["topk"] == [] and s["tensorrt"]["plugins"]["kmeans_smem"][0]["n"] == 60
    assert s["export"]["wall_s"] > 0 and s["export"]["peak_rss"] > 0 and not s["gates_failed"]


def test_markdown_section(result):
    res, md = result
    assert "<!-- bench:backbone -->" in md and "<!-- /bench:backbone -->" in md
    assert f"cvig-padded-auto (P = {res['sizes'][0]['capacity']['capacity']})" in md
    assert "| 96×160 | 60 (6×10) | vig |" in md
    assert f"cvig-padded-balanced (P = 19, {res['sizes'][0]['balanced']['overflow_fraction'] * 100:.1f} % overflow)" in md
    assert f"the largest k-means partition holds {res['sizes'][0]['capacity']['largest_partition']} of 60 tokens" in md
    assert "cvig export --model cvig_nano --features --feature-pyramid" in md
    assert "Gates of the exports: all passed." in md


def test_a_childs_peak_memory_is_its_own(tmp_path):
    # a large parent: the kernel's ru_maxrss of a (v)forked child would report at least the parent's size
    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    rc, wall, peak = backbone.run_child(["platform"], tmp_path / "child.log")
    assert rc == 0 and wall > 0 and (tmp_path / "child.log").read_text().strip()
    assert 0 < peak < 200 * 2**20, peak  # python -m platform: tens of MiB
    assert common.status_kib("VmHWM") * 1024 >= len(ballast)
