"""A backbone export in the runtimes (issue #26): Session returns named feature maps, cvig run lists and writes
them, cvig bench times a non-square backbone. The reference is the PyTorch model on the same preprocessed
images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.plugin_graph import to_plugin_graph
from clustervig.preprocess import load_batch, sample_photographs, transform_spec
from clustervig.runtime import extract_features, open_session
from clustervig.runtime.cli import bench_main, run_main

from conftest import make_model

SIZE = (96, 160)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = make_model("cvig_nano", img_size=SIZE, features_only=True, feature_pyramid=True,
                   calib_images=None)
    return m


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    import onnx

    d = tmp_path_factory.mktemp("bb")
    export_onnx(model, d / "static.onnx", BatchSpec(2, 2, 2))
    export_onnx(model, d / "dynamic.onnx", BatchSpec(1, 2, 4))
    onnx.save(to_plugin_graph(onnx.load(str(d / "static.onnx")))[0], str(d / "plugins.onnx"))
    return d


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("img")
    files = []
    for name in ("astronaut", "coffee", "rocket"):  # a 3rd image: a static batch of 2 pads its last chunk
        arr = getattr(data, name)()
        path = d / f"{name}.png"
        Image.fromarray(arr[..., :3]).save(path)
        files.append(path)
    return files


def torch_maps(model, x: torch.Tensor):
    with torch.no_grad():
        return {o["name"]: t.numpy() for o, t in zip(model.cfg.feature_outputs(), model(x))}


@pytest.mark.parametrize("name", ["static.onnx", "dynamic.onnx", "plugins.onnx"])
def test_session_returns_named_maps_equal_to_pytorch(model, artifacts, name):
    x = sample_photographs(transform_spec(model.cfg))[:3]  # three images: a static batch of 2 is chunked
    assert x.shape[2:] == SIZE
    with open_session(artifacts / name) as s:
        assert s.is_backbone and s.output_names == ["p3", "p4", "p5", "p6"]
        assert [o["stride"] for o in s.outputs] == [8, 16, 32, 64]
        got = s.infer(x.numpy())
    ref = torch_maps(model, x)
    assert list(got) == ["p3", "p4", "p5", "p6"]
    for k in ref:
        assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape
        np.testing.assert_allclose(got[k], ref[k], atol=1e-4 * float(np.abs(ref[k]).max()), rtol=0)


def test_extract_features_and_cvig_run_write_the_maps(model, artifacts, image_files, tmp_path):
    with open_session(artifacts / "static.onnx") as s:
        res = extract_features(s, image_files, batch=2)
    assert [r["file"] for r in res] == [str(f) for f in image_files]
    ref = torch_maps(model, load_batch(image_files, transform_spec(model.cfg)))
    for i, r in enumerate(res):
        for k, m in r["maps"].items():
            np.testing.assert_allclose(m, ref[k][i], atol=1e-4 * float(np.abs(ref[k]).max()), rtol=0)
    out = tmp_path / "maps.npz"
    cli = CliRunner().invoke(run_main, [str(artifacts / "dynamic.onnx"), *map(str, image_files), "-o", str(out)])
    assert cli.exit_code == 0, cli.output
    assert "p3       16x12x20" in cli.output and "max|x|" in cli.output
    z = np.load(out)
    assert sorted(z.files) == ["files", "p3", "p4", "p5", "p6"]
    assert list(z["files"]) == [str(f) for f in image_files]
    for k in ("p3", "p4", "p5", "p6"):
        np.testing.assert_allclose(z[k], ref[k], atol=1e-4 * float(np.abs(ref[k]).max()), rtol=0)
    js = CliRunner().invoke(run_main, [str(artifacts / "dynamic.onnx"), str(image_files[0]), "--json"])
    rec = json.loads(js.output)[0]["maps"]["p4"]
    assert rec["shape"] == [32, 6, 10] and rec["max_abs"] == pytest.approx(float(np.abs(ref["p4"][0]).max()), rel=1e-4)


@pytest.mark.parametrize("extra,words", [(["-o", "maps.json"], "give -o FILE.npz"),
                                         (["--labels", "LABELS"], "drop --labels")])
def test_cvig_run_refuses_classifier_options_for_a_backbone(artifacts, image_files, tmp_path, extra, words):
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    extra = [str(labels) if e == "LABELS" else str(tmp_path / e) if e.endswith(".json") else e for e in extra]
    res = CliRunner().invoke(run_main, [str(artifacts / "static.onnx"), str(image_files[0]), *extra])
    assert res.exit_code == 2 and words in res.output, res.output
    assert not (tmp_path / "maps.json").exists()


def test_extract_features_refuses_a_classifier(tmp_path):
    clf = make_model("cvig_nano")
    export_onnx(clf, tmp_path / "clf.onnx", BatchSpec(1, 1, 1))
    with open_session(tmp_path / "clf.onnx") as s:
        assert not s.is_backbone and s.output_names == ["logits"]
        with pytest.raises(Exception, match="is a classifier"):
            extract_features(s, [])


def test_cvig_bench_times_a_non_square_backbone(artifacts, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_main, [str(artifacts / "dynamic.onnx"), "--batch", "1,3", "--iters", "2",
                                          "--warmup", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["latency_ms_p50"] > 0 for r in rows)


def test_cvig_compare_on_backbone_artifacts(model, artifacts, tmp_path):
    from clustervig import save_checkpoint
    from clustervig.export.compare import main as compare_main

    # every map of every artifact against the first, and the PyTorch model (from a checkpoint) first of all
    ck = save_checkpoint(model, tmp_path / "bb.pth")
    res = CliRunner().invoke(compare_main, [str(artifacts / "static.onnx"), str(artifacts / "plugins.onnx"),
                                            str(artifacts / "dynamic.onnx"), "--checkpoint", str(ck)])
    assert res.exit_code == 0 and res.output.strip().endswith("PASSED"), res.output
    assert res.output.count("PASSED (") == 3  # plugins, dynamic and the ONNX graphs vs PyTorch
    # a checkpoint trained as a 224-px classifier gives a backbone of other weights: compared, it fails
    other = make_model("cvig_nano", seed=1)
    ck2 = save_checkpoint(other, tmp_path / "clf.pth")
    res = CliRunner().invoke(compare_main, [str(artifacts / "static.onnx"), "--checkpoint", str(ck2)])
    assert res.exit_code == 1 and "FAILED" in res.output, res.output
