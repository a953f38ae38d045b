"""cvig convert --from authors: checkpoints of the authors' ClusterViG code (numerics="authors").

The fixture (tests/fixtures/authors/README.md) is a small model written by the authors' code itself,
with its logits on four photographs computed by that code (k-means init patched to ours).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clustervig.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, recorded_config
from clustervig.convert import ConvertError, command as convert_main, converted_config, convert_authors
from clustervig.registry import create_model

FIX = Path(__file__).parent / "fixtures" / "authors"
STATE = FIX / "authors_small_state.pth"
CONFIG = FIX / "config.json"


def assert_matches_authors(logits: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (logits - ref).abs().max().item()
    assert diff <= tol, f"max |dlogits| vs the authors' code = {diff:.3g} > {tol:.3g}"
    assert torch.equal(logits.argmax(1), ref.argmax(1))


def run(args):
    return CliRunner().invoke(convert_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "small_cvig.pth"
    res = run(["--from", "authors", STATE, "--config", CONFIG, "-o", out])
    assert res.exit_code == 0, res.output
    return out


def test_converted_fixture_reproduces_the_authors_logits(converted):
    cfg = recorded_config(converted)
    assert cfg["numerics"] == "authors" and cfg["groups"] == 1 and cfg["gcn"] == "mr"
    assert (cfg["dim"], cfg["depth"], cfg["grid"], cfg["img_size"], cfg["clusters"], cfg["num_classes"]) == (64, 2, 8, 64, 4, 10)
    model = model_from_checkpoint(converted).eval()
    x, ref = torch.load(FIX / "inputs.pt"), torch.load(FIX / "authors_logits.pt")
    with torch.no_grad():
        assert_matches_authors(model(x), ref)
        model.set_form("reference")  # the reference form computes the same numerics
        assert_matches_authors(model(x), ref)
        model.set_form("static").set_kernels(True)  # k-NN and gather-max-rel on the host kernels
        assert_matches_authors(model(x), ref)
        model.set_kernels(False)
        # the paper's numerics on the same weights are another function (why numerics is recorded)
        paper = create_model("cvig_ti", **{**{k: cfg[k] for k in ("dim", "depth", "grid", "img_size", "clusters",
                                                                   "groups", "num_classes", "stem_layers")}, "numerics": "paper"})
        paper.load_state_dict(model.state_dict())
        assert (paper.eval()(x) - ref).abs().max() > 1e-2


def test_wrapped_ddp_checkpoint_without_distillation_head(tmp_path):
    sd = torch.load(STATE)
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items() if not k.startswith("dist_head.")},
               "epoch": 3, "args": argparse.Namespace(model="IsoClusterViG_Ti_n196_c4", lr=1e-3)}
    src = tmp_path / "checkpoint.pth"
    torch.save(wrapped, src)
    res = run(["--from", "authors", src, "--config", CONFIG, "-o", tmp_path / "c.pth", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["config"]["distillation"] is False and rec["keys"] == len(sd) - 2


def test_load_checkpoint_on_an_authors_file_points_to_convert():
    model = create_model("cvig_ti", num_classes=10)
    with pytest.raises(CheckpointError, match=r"cvig convert --from authors"):
        load_checkpoint(model, STATE)


def test_cli_errors(tmp_path):
    out = tmp_path / "o.pth"
    # clusters are not in the weights and an 8x8 grid is none of the authors' variants
    res = run(["--from", "authors", STATE, "-o", out])
    assert res.exit_code != 0 and '{"clusters": 4}' in res.output and not out.exists()
    # the image size is not in the weights either: 224 is too large for this 4-layer stem and an 8x8 grid
    (tmp_path / "c.json").write_text('{"clusters": 4}')
    res = run(["--from", "authors", STATE, "--config", tmp_path / "c.json", "-o", out])
    assert res.exit_code != 0 and "give img_size in --config" in res.output and '{"img_size": 64}' in res.output
    # a registered variant of another size
    res = run(["--from", "authors", STATE, "--model", "cvig_s", "-o", out])
    assert res.exit_code != 0 and "not a cvig_s" in res.output and "dim=64, depth=2, grid=8" in res.output
    # --config: not JSON, not an object, unknown option, contradicting the weights
    for text, msg in [("{dim: 64", "not valid JSON"), ("[1, 2]", "JSON object"), ('{"clusterz": 4}', "clusterz"),
                      ('{"clusters": 4, "img_size": 64, "dim": 128}', "shape mismatches")]:
        (tmp_path / "c.json").write_text(text)
        res = run(["--from", "authors", STATE, "--config", tmp_path / "c.json", "-o", out])
        assert res.exit_code != 0 and msg in res.output, (text, res.output)
    assert not out.exists()
    # keys with no counterpart are listed with the reason
    sd = torch.load(STATE)
    sd["backbone.0.graphconv.layer.nn_vertex.layer.extra"] = torch.zeros(1)
    sd["backbone.1.relative_pos"] = torch.zeros(1)
    torch.save(sd, tmp_path / "odd.pth")
    res = run(["--from", "authors", tmp_path / "odd.pth", "--config", CONFIG, "-o", out])
    assert res.exit_code != 0 and "2 key(s)" in res.output
    assert "backbone.0.graphconv.layer.nn_vertex.layer.extra: graph-convolution parameter" in res.output
    assert "backbone.1.relative_pos: relative positional embedding" in res.output
    # not the authors' layout; missing source; output a folder (checked before any work)
    torch.save(create_model("cvig_nano").state_dict(), tmp_path / "ours.pth")
    res = run(["--from", "authors", tmp_path / "ours.pth", "-o", out])
    assert res.exit_code != 0 and "already has this package's layout" in res.output
    res = run(["--from", "authors", tmp_path / "missing.pth", "-o", out])
    assert res.exit_code != 0 and "does not exist" in res.output
    res = run(["--from", "authors", STATE, "-o", tmp_path])
    assert res.exit_code != 0 and "is a directory" in res.output


def test_variant_inference_and_groups_override():
    # the authors' S / B / B-dagger use groups=1 where the paper (and our registry) use 4
    for name, (dim, depth, grid) in {"cvig_s": (320, 16, 14), "cvig_b": (640, 16, 14), "cvig_b_hr": (640, 16, 28)}.items():
        structure = {"dim": dim, "depth": depth, "grid": grid, "gcn": "mr", "groups": 1, "num_classes": 1000,
                     "head_dim": 1024, "stem_layers": 5, "distillation": True}
        base, over = converted_config(structure)
        assert base == name and over["groups"] == 1 and over["numerics"] == "authors"
        assert over["clusters"] == (6 if grid == 28 else 4)
    # their Ti_n784_c6 is not registered: the clusters of their 28x28 variants
    base, over = converted_config({**structure, "dim": 192, "depth": 12})
    assert base == "cvig_ti" and over["grid"] == 28 and over["clusters"] == 6
    with pytest.raises(ConvertError, match="not a cvig_ti"):
        converted_config(structure, model="cvig_ti")


def test_gmrgcn_interleaved_columns_map_to_blockwise():
    # their MLP input is [x0, r0, x1, r1, ..., z']; the converted weight must give the same outputs
    from clustervig.convert import _mr_permutation

    c = 5
    w = torch.randn(7, 3 * c)
    x, r, z = torch.randn(c), torch.randn(c), torch.randn(c)
    theirs = torch.cat([torch.stack([x, r], dim=1).reshape(-1), z])
    ours = torch.cat([x, r, z])
    assert torch.allclose(w @ theirs, w[:, _mr_permutation(c)] @ ours)


def test_export_fp16_and_run_on_a_photo(tmp_path, converted):
    from PIL import Image
    from skimage import data

    from clustervig.export.cli import main as export_main
    from clustervig.runtime.cli import run_main

    from clustervig.export.plugin_graph import ort_session

    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(converted), "--fp16", "--plugins", "--no-engine",
                                           "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    val = report["validation"]["results"]["photos"]
    assert val["fp32 vs pytorch"]["max_abs_diff"] <= 1e-4 and val["fp32 vs pytorch"]["top1_agreement"] == 1.0
    assert report["gates"]["enforced"] is True and report["gates"]["failed"] == []
    # the plugin graph (k-means with its centroids as CvigKMeansCentroids, on the host kernels)
    # reproduces the authors' code too
    assert report["plugins"]["replaced"] == {"CvigKMeansCentroids": 2, "CvigPartitionedKNN": 2, "CvigGatherMaxRel": 2}
    x, ref = torch.load(FIX / "inputs.pt"), torch.load(FIX / "authors_logits.pt")
    import onnx

    sess = ort_session(onnx.load(str(out / "model_plugins.onnx")))  # batch 1, the export's default
    plugin_logits = np.concatenate([sess.run(None, {"images": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    assert_matches_authors(torch.from_numpy(plugin_logits), ref)
    meta = json.loads((out / "model_fp16.json").read_text())
    assert json.loads(meta["clustervig.config"])["numerics"] == "authors"
    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    res = CliRunner().invoke(run_main, [str(out / "model_fp16.onnx"), str(tmp_path / "coffee.png"), "--json"])
    assert res.exit_code == 0, res.output
    pred = json.loads(res.output)
    assert pred


def test_edgeconv_weights_are_not_permuted():
    # G-EdgeConv's input [x_i, x_j - x_i, z'] is block-wise in both codes; the weights look like G-MRGCN's
    sd = torch.load(STATE)
    net = convert_authors(sd, config={**json.loads(CONFIG.read_text()), "gcn": "edge"})
    raw = sd["backbone.0.graphconv.layer.nn_vertex.layer.lins.0.head_list.0.weight"]
    assert net.cfg.gcn == "edge"
    assert torch.equal(net.blocks[0].grapher.degc.local.nn[0].weight[:, :, 0, 0], raw)
