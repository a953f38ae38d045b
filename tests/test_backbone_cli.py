"""cvig export --features / --img-size (issue #26): a backbone at a non-square size through the command line,
its named maps validated against PyTorch, and every bad size or option refused before any work."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import clustervig
from clustervig import save_checkpoint
from clustervig.export.cli import main as export_main
from clustervig.export.validate import OrtModel, torch_outputs
from clustervig.train import WEIGHTS_DIR

from conftest import make_model, varied_images

SIZE = "96x160"


@pytest.fixture(scope="module")
def nano224(tmp_path_factory):
    """A cvig_nano classifier checkpoint at its trained 224 x 224 (14 x 14 tokens)."""
    return save_checkpoint(make_model("cvig_nano"), tmp_path_factory.mktemp("ck") / "nano224.pth")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, nano224):
    out = tmp_path_factory.mktemp("bb") / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano224), "--features", "--out-indices", "0,-1",
                                           "--img-size", SIZE, "--fp16", "--plugins", "--dynamic-batch", "1:2:4",
                                           "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_backbone_export_files_outputs_and_report(exported):
    out, res = exported
    # no labels.txt: a backbone has no classes
    assert sorted(p.name for p in out.iterdir()) == ["model_fp16.json", "model_fp16.onnx", "model_fp32.json",
                                                     "model_fp32.onnx", "model_plugins.json", "model_plugins.onnx",
                                                     "preprocess.json", "report.json"]
    g = onnx.load(str(out / "model_fp32.onnx"))
    assert [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in g.graph.output] == [
        ("block0", ["batch", 32, 6, 10]), ("block2", ["batch", 32, 6, 10])]
    assert json.loads((out / "preprocess.json").read_text())["img_size"] == [96, 160]
    report = json.loads((out / "report.json").read_text())
    assert [o["name"] for o in report["outputs"]] == ["block0", "block2"]
    assert report["checkpoint_notes"]["pos_embed_resampled"] == {
        "from_grid": [14, 14], "to_grid": [6, 10], "method": "bicubic, antialias (timm's resample_abs_pos_embed)"}
    assert "img_size=(96, 160)" in res.output and "features_only=True" in res.output  # the model line names it
    for set_name, comps in report["validation"]["results"].items():
        for cmp_name, r in comps.items():
            assert set(r["outputs"]) == {"block0", "block2"}, (set_name, cmp_name)
            assert "top1_agreement" not in r
        assert comps["fp32 vs pytorch"]["cosine_min"] >= 0.9999 and comps["plugins vs fp32"]["cosine_min"] >= 0.9999
        assert comps["plugins vs fp32"]["label_agreement"] == 1.0
    # gates judged every map (the worst one's cosine), no top-1 gate for a backbone
    gates = report["gates"]
    assert not gates["failed"] and {r["gate"] for r in gates["results"]} >= {"fp32.cosine", "plugins.cosine"}
    assert not any(r["gate"].endswith(".top1") for r in gates["results"])
    mem = report["artifacts"]["fp32"]["tensorrt_memory"]
    assert mem["batch"] == 4 and mem["topk"] and mem["max_elements"] < mem["max_elements_limit"]
    assert "block2" in res.output and "cosine>=0.9999 top1" not in res.output


def test_backbone_export_equals_pytorch_on_new_images(exported, nano224):
    out, _ = exported
    model = clustervig.model_from_checkpoint(nano224, img_size=(96, 160), features_only=True, out_indices=(0, -1))
    x = varied_images(3, (96, 160), seed=31)
    ref = torch_outputs(model.eval(), x)
    got = OrtModel(out / "model_fp32.onnx").run(x.numpy())
    for name in ("block0", "block2"):
        np.testing.assert_allclose(got[name], ref[name], atol=1e-4 * float(np.abs(ref[name]).max()), rtol=0)


def test_trained_digits_checkpoint_as_a_pyramid_backbone(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--features",
                                           "--feature-pyramid", "--img-size", "32x48", "--fp16", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [(o["name"], o["stride"], o["shape"]) for o in report["outputs"]] == [
        ("p1", 2, [32, 16, 24]), ("p2", 4, [64, 8, 12]), ("p3", 8, [64, 4, 6]), ("p4", 16, [64, 2, 3])]
    assert report["checkpoint_notes"]["untrained"] == ["pyramid.up.weight", "pyramid.up.bias"]
    assert report["checkpoint_notes"]["pos_embed_resampled"]["to_grid"] == [8, 12]
    assert "untrained until a detector trains them" in res.output
    # a trained checkpoint: the FP16 gate (cosine >= 0.9 of the worst map) applies, and passes
    fp16 = [r for r in report["gates"]["results"] if r["gate"] == "fp16.cosine"]
    assert fp16 and all(r["passed"] for r in fp16)


@pytest.mark.parametrize("args,words", [
    (["--model", "cvig_nano", "--img-size", "100x160"], ["--img-size", "not a multiple of cvig_nano's stride 16",
                                                         "nearest being 96x160"]),
    (["--model", "cvig_s", "--img-size", "16x32", "--features"], ["1x2 token grid", "fewer than the 4 clusters"]),
    (["--model", "cvig_nano", "--img-size", "800xwide"], ["--img-size", "not a size"]),
    (["--model", "cvig_nano", "--out-indices", "1"], ["--out-indices chooses a backbone's outputs: add --features"]),
    (["--model", "cvig_nano", "--feature-pyramid"], ["add --features"]),
    (["--model", "cvig_nano", "--features", "--out-indices", "0,5"], ["--out-indices", "[5] out of range"]),
    (["--model", "cvig_nano", "--features", "--out-indices", "0,1", "--feature-pyramid"], ["one block"]),
    (["--model", "cvig_nano", "--features", "--num-classes", "10"], ["a --features export has none"]),
    (["--model", "cvig_nano", "--features", "--validate-set", "digits"], ["drop --validate-set"]),
    (["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--img-size", "34x48"],
     ["the model of checkpoint", "stride 4", "nearest being 36x48"]),
])
def test_bad_sizes_and_options_are_refused_before_any_work(tmp_path, monkeypatch, args, words):
    import clustervig.export.cli as cli

    monkeypatch.setattr(cli, "_export", lambda *a, **k: pytest.fail("the export started"))
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, args + ["-o", str(out)])
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.output, res.output
    assert not out.exists()  # nothing was created
