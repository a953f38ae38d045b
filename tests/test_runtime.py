"""Python runtime: cvig-run / cvig-bench on exported models, real image files, bad inputs."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import clustervig
from clustervig.data import digits_split, write_image_folder
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.preprocess import load_batch, transform_spec
from clustervig.runtime import RuntimeErrorWithFix, classify_files, open_session
from clustervig.runtime.classify import class_names
from clustervig.runtime.cli import bench_main, run_main
from clustervig.train import WEIGHTS_DIR
from clustervig.utils import calibrate_batchnorm


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    files = []
    for name, ext in [("astronaut", "jpg"), ("coffee", "png"), ("chelsea", "jpg"), ("camera", "png")]:
        arr = getattr(data, name)()
        path = d / f"{name}.{ext}"
        Image.fromarray(arr).save(path, quality=95) if ext == "jpg" else Image.fromarray(arr).save(path)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def nano(tmp_path_factory, photo_files):
    torch.manual_seed(0)
    model = clustervig.create_model("cvig_nano")
    calibrate_batchnorm(model, [load_batch(photo_files, transform_spec(model.cfg))])
    d = tmp_path_factory.mktemp("nano")
    export_onnx(model, d / "dyn.onnx", BatchSpec(1, 2, 8))
    export_onnx(model, d / "static2.onnx", BatchSpec(2, 2, 2))
    export_onnx(model, d / "norm.onnx", BatchSpec(1, 2, 8), normalize_in_graph=True)
    return model.eval(), d


def torch_logits(model, files):
    with torch.no_grad():
        return model(load_batch(files, transform_spec(model.cfg))).numpy()


@pytest.mark.parametrize("onnx_name", ["dyn.onnx", "static2.onnx", "norm.onnx"])
def test_run_logits_equal_pytorch_on_photographs(nano, photo_files, onnx_name):
    model, d = nano
    res = CliRunner().invoke(run_main, [str(d / onnx_name), *map(str, photo_files), "--json", "--batch", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    logits = np.array([r["logits"] for r in out], dtype=np.float32)
    assert np.abs(logits - torch_logits(model, photo_files)).max() <= 1e-4
    assert [r["file"] for r in out] == list(map(str, photo_files))
    assert len(out[0]["top"]) == 5 and out[0]["top"][0]["logit"] >= out[0]["top"][1]["logit"]


def test_run_digits_classifies_real_scans(tmp_path):
    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    export_onnx(model, tmp_path / "digits.onnx", BatchSpec(1, 16, 64))
    _, test = digits_split()
    files = sorted(write_image_folder(test, tmp_path / "imgs", per_class=3).rglob("*.png"))
    res = CliRunner().invoke(run_main, [str(tmp_path / "digits.onnx"), *map(str, files), "--json", "--topk", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    truth = [f.parent.name for f in files]
    pred = [r["top"][0]["name"] for r in out]
    assert sum(p == t for p, t in zip(pred, truth)) >= 29  # 30 held-out scans, names '0'..'9'
    logits = np.array([r["logits"] for r in out], dtype=np.float32)
    assert np.abs(logits - torch_logits(model, files)).max() <= 1e-4


def test_table_output_and_labels_file(nano, photo_files, tmp_path):
    _, d = nano
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {i}" for i in range(1000)))
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(photo_files[0]), "--topk", "2", "--labels", str(labels)])
    assert res.exit_code == 0 and "thing " in res.output and res.output.count("%") == 2
    labels.write_text("a\nb\n")
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(photo_files[0]), "--labels", str(labels)])
    assert res.exit_code == 1 and "has 2 names but the model has 1000 classes" in res.output


def test_imagenet_names_for_a_1000_class_model(nano, photo_files):
    _, d = nano
    with open_session(d / "dyn.onnx") as s:
        assert s.config["num_classes"] == 1000 and not s.config.get("class_names")
        names = class_names(s)
    # the ILSVRC-2012 index order (synsets sorted by WordNet id)
    assert len(names) == 1000 and len(set(names)) == 998  # "crane" (134, 517) and "maillot" (638, 639) repeat
    assert (names[0], names[1], names[207], names[281], names[409], names[999]) == (
        "tench", "goldfish", "golden retriever", "tabby", "analog clock", "toilet tissue")
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(photo_files[0]), "--topk", "1", "--json"])
    assert json.loads(res.output)[0]["top"][0]["name"] in names


def test_plugin_graph_runs_in_the_runtime(nano, photo_files, tmp_path):
    import onnx

    from clustervig.export.plugin_graph import to_plugin_graph

    model, d = nano
    pg, _ = to_plugin_graph(onnx.load(str(d / "dyn.onnx")))
    onnx.save(pg, str(tmp_path / "plugins.onnx"))
    with open_session(tmp_path / "plugins.onnx") as s:
        out = classify_files(s, photo_files, batch=4)
    logits = np.array([r["logits"] for r in out], dtype=np.float32)
    assert np.abs(logits - torch_logits(model, photo_files)).max() <= 1e-4


def test_bench_table_and_json(nano, tmp_path):
    _, d = nano
    js = tmp_path / "b.json"
    res = CliRunner().invoke(bench_main, [str(d / "dyn.onnx"), "--batch", "1,2", "--iters", "3", "--warmup", "1", "-o", str(js)])
    assert res.exit_code == 0, res.output
    rows = json.loads(js.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["latency_ms_p50"] > 0 and r["latency_ms_p99"] >= r["latency_ms_p50"] for r in rows)
    assert rows[1]["throughput_img_s"] == pytest.approx(2 / (rows[1]["latency_ms_p50"] / 1e3))
    assert "p50 ms" in res.output
    res = CliRunner().invoke(bench_main, [str(d / "static2.onnx"), "--batch", "1,2", "--iters", "2", "--warmup", "0"])
    assert res.exit_code == 0 and "skipped batch [1]" in res.output
    # --json: the same rows on stdout
    res = CliRunner().invoke(bench_main, [str(d / "dyn.onnx"), "--batch", "2", "--iters", "2", "--json"])
    assert res.exit_code == 0 and [r["batch"] for r in json.loads(res.stdout)["rows"]] == [2]


@pytest.mark.parametrize("args,message", [
    (["--iters", "0"], "0 is not in the range x>=1"),
    (["--batch", "1,0"], "batch sizes are integers >= 1"),
    (["-o", "{tmp}/missing/b.json"], "does not exist"),
    (["-o", "{tmp}"], "is a directory"),
    (["-o", "/proc/cvig_bench.json"], "cannot be written"),
])
def test_bench_bad_options_fail_before_any_work(nano, tmp_path, args, message):
    _, d = nano
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(bench_main, [str(d / "dyn.onnx"), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert "p50 ms" not in res.output


@pytest.mark.parametrize("args,message", [
    (["--topk", "0"], "0 is not in the range x>=1"),
    (["--batch", "0"], "0 is not in the range x>=1"),
    (["-o", "/proc/cvig_run.json"], "cannot be written"),
])
def test_run_bad_options(nano, photo_files, args, message):
    _, d = nano
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(photo_files[0]), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_bad_model_files(tmp_path, nano, photo_files):
    _, d = nano
    cases = {
        "missing.onnx": None,
        "corrupt.onnx": b"this is not onnx",
        "truncated.onnx": (d / "dyn.onnx").read_bytes()[:5000],
        "model.xyz": b"x",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        res = CliRunner().invoke(run_main, [str(tmp_path / name), str(photo_files[0])])
        assert res.exit_code == 1, (name, res.output)
        assert name in res.output and "Traceback" not in res.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed: tested by the trt tests")
def test_engine_without_tensorrt_says_so(tmp_path, photo_files):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(run_main, [str(plan), str(photo_files[0])])
    assert res.exit_code == 1 and "needs TensorRT" in res.output and "m.plan" in res.output


def test_missing_plugin_library_and_cuda_graph_misuse(tmp_path, nano, photo_files):
    _, d = nano
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(run_main, [str(plan), str(photo_files[0]), "--plugins-lib", str(tmp_path / "libnope.so")])
    assert res.exit_code == 1 and "libnope.so does not exist" in res.output and "`cvig build-plugins`" in res.output
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(photo_files[0]), "--cuda-graph"])
    assert res.exit_code == 2 and "--cuda-graph applies to TensorRT engines" in res.output


def test_cuda_errors_are_named_and_pinned_views_are_exact():
    # the TensorRT session's CUDA plumbing, with cuda-python's real enums (no GPU needed)
    from cuda.bindings import runtime as cudart

    from clustervig.runtime.session import _cuda_check, _PinnedBuffer

    assert _cuda_check((cudart.cudaError_t.cudaSuccess, 7), "x") == 7
    with pytest.raises(RuntimeErrorWithFix, match="CUDA error in cudaMallocHost: cudaErrorMemoryAllocation"):
        _cuda_check((cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMallocHost")
    backing = np.arange(24, dtype=np.float32)
    buf = _PinnedBuffer()
    buf.host = backing.ctypes.data  # stand-in for cudaMallocHost memory: host_array is a view, not a copy
    view = buf.host_array((2, 3, 4), np.float32)
    assert np.array_equal(view.ravel(), backing)
    view[1, 2, 3] = -1.0
    assert backing[23] == -1.0
    buf.host = 0


def test_bad_images(tmp_path, nano, photo_files):
    _, d = nano
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(photo_files[0].read_bytes()[:300])
    webp = tmp_path / "photo.jpg"  # named like a JPEG, but WebP inside: refused by content, with the fix
    Image.new("RGB", (64, 64)).save(webp, format="WEBP")
    for f, msg in [(tmp_path / "nope.png", "does not exist"), (bad, "could not be read"), (webp, "is a WebP file"),
                   (tmp_path, "is a directory")]:
        res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), str(f)])
        assert res.exit_code == 1 and msg in res.output and str(f) in res.output, res.output


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed on this machine")
def test_engine_from_garbage_bytes_is_explained(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeErrorWithFix, match="could not deserialize"):
        open_session(plan)


@pytest.fixture(scope="module")
def nano_engine(nano, tmp_path_factory):
    from clustervig.export.trt_build import build_engine

    _, d = nano
    out = tmp_path_factory.mktemp("engine")
    plan = build_engine(d / "dyn.onnx", out / "model_fp32.plan", BatchSpec(1, 2, 8), 224)
    meta = {p.key: p.value for p in __import__("onnx").load(str(d / "dyn.onnx")).metadata_props}
    (out / "model_fp32.json").write_text(json.dumps(meta))
    return plan


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed on this machine")
def test_engine_logits_equal_onnx_with_and_without_cuda_graphs(nano, nano_engine, photo_files):
    model, d = nano
    ref = torch_logits(model, photo_files)
    for graph in (False, True):
        with open_session(nano_engine, cuda_graph=graph) as s:
            assert s.preprocess["img_size"] == 224  # read from model_fp32.json beside the engine
            for _ in range(2):  # the second call replays the captured graph
                out = np.array([r["logits"] for r in classify_files(s, photo_files, batch=3)], np.float32)
                assert np.abs(out - ref).max() <= 1e-3


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed on this machine")
def test_engine_bad_inputs(nano_engine, tmp_path):
    trunc = tmp_path / "trunc.plan"
    trunc.write_bytes(nano_engine.read_bytes()[:4096])
    with pytest.raises(RuntimeErrorWithFix, match="could not deserialize"):
        open_session(trunc)
    with open_session(nano_engine) as s:
        with pytest.raises(RuntimeErrorWithFix, match=r"takes \[B, 3, H, W\]"):
            s.infer(np.zeros((1, 4, 224, 224), np.float32))
        with pytest.raises(RuntimeErrorWithFix, match="outside the engine's optimization profile"):
            s.infer(np.zeros((1, 3, 200, 200), np.float32))
        big = s.infer(np.zeros((11, 3, 224, 224), np.float32))  # > profile max 8: run in chunks
        assert big.shape == (11, 1000)


def test_run_goes_on_after_unreadable_images(nano, photo_files, tmp_path):
    """One unreadable image no longer aborts the run: it is named on stderr, the readable ones are classified
    (logits equal to PyTorch's on them alone) and written, and the exit status is 1 at the end; --strict stops
    at the first."""
    model, d = nano
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo_files[0].read_bytes()[:300])
    missing = tmp_path / "missing.png"
    files = [photo_files[0], broken, photo_files[1], missing, photo_files[2]]
    out = tmp_path / "r.json"
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), *map(str, files), "--batch", "2", "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert f"skipped: image {broken} could not be read" in res.stderr and f"skipped: image {missing} does not exist" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == (
        f"Error: 2 of 5 images could not be read and were left out (each named above; {broken}, {missing}); the "
        "results are those of the other 3. Fix or remove them, or pass --strict to stop at the first")
    readable = [photo_files[0], photo_files[1], photo_files[2]]
    results = json.loads(out.read_text())
    assert [r["file"] for r in results] == list(map(str, readable))
    np.testing.assert_allclose(np.array([r["logits"] for r in results]), torch_logits(model, readable), atol=1e-4, rtol=0)
    assert [r["file"] for r in results] == [line for line in res.stdout.splitlines() if not line.startswith(" ")]
    # --strict: the first unreadable file stops the run, nothing is written
    out.unlink()
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), *map(str, files), "--strict", "-o", str(out)])
    assert res.exit_code == 1 and f"image {broken} could not be read" in res.output and "--strict" in res.output
    assert not out.exists() and str(photo_files[0]) not in res.stdout
    # the library keeps raising by default
    from clustervig.preprocess import ImageError

    with open_session(d / "dyn.onnx") as s:
        with pytest.raises(ImageError, match="could not be read"):
            classify_files(s, files)
        seen = []
        assert len(classify_files(s, files, on_error=lambda p, e: seen.append(p))) == 3 and seen == [broken, missing]


def test_run_shows_progress_on_stderr_unless_json(nano, photo_files, monkeypatch):
    from clustervig.cliutil import Progress

    monkeypatch.setattr(Progress, "quiet_s", 0.0)  # the test run is fast: show its progress anyway
    _, d = nano
    files = [str(photo_files[i % 4]) for i in range(20)]
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), *files, "--batch", "4", "--topk", "1"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("cvig run dyn.onnx: ")]
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == ["8/20 images", "12/20 images", "16/20 images",
                                                                     "20/20 images"], res.stderr
    assert "images (" not in res.stdout
    res = CliRunner().invoke(run_main, [str(d / "dyn.onnx"), *files, "--batch", "4", "--json"])
    assert res.exit_code == 0 and res.stderr == "" and len(json.loads(res.stdout)) == 20


def test_bench_follows_the_artifacts_batch_range(nano, tmp_path):
    """Without --batch: the artifact's own batches (static 2 -> [2]; dynamic 1:2:8 -> [1, 2, 8]); a requested
    batch outside the range is named and skipped, all outside is an error."""
    _, d = nano
    assert open_session(d / "static2.onnx").batch_profile == (2, 2, 2)
    assert open_session(d / "dyn.onnx").batch_profile == (1, 2, 8)

    def rows(*args):
        res = CliRunner().invoke(bench_main, [*args, "--iters", "1", "--warmup", "0", "--json"])
        assert res.exit_code == 0, res.output
        return [r["batch"] for r in json.loads(res.stdout)["rows"]], res.stderr

    assert rows(str(d / "static2.onnx")) == ([2], "")
    assert rows(str(d / "dyn.onnx")) == ([1, 2, 8], "")
    got, err = rows(str(d / "dyn.onnx"), "--batch", "2,16")
    assert got == [2] and err.strip() == ("skipped batch [16]: dyn.onnx takes batches 1 to 8 (exported with "
                                          "--dynamic-batch 1:2:8); export with a --dynamic-batch MIN:OPT:MAX range "
                                          "that covers them to benchmark them")
    res = CliRunner().invoke(bench_main, [str(d / "dyn.onnx"), "--batch", "16,32", "--iters", "1"])
    assert res.exit_code == 1 and "takes batches 1 to 8 (exported with --dynamic-batch 1:2:8), not batch 16, 32" in res.output
    res = CliRunner().invoke(bench_main, [str(d / "static2.onnx"), "--batch", "8", "--iters", "1"])
    assert res.exit_code == 1 and "takes a static batch of 2, not batch 8" in res.output and "p50" not in res.output
    help_text = CliRunner().invoke(bench_main, ["--help"]).output
    assert "default: the artifact's own batches" in help_text


def test_open_session_and_classify_files_document_what_they_take_and_return(nano, photo_files):
    _, d = nano
    doc = open_session.__doc__
    for word in (".onnx", ".plan", ".engine", ".trt", "providers", "plugin_library", "cuda_graph", "Returns",
                 "RuntimeErrorWithFix"):
        assert word in doc, word
    with open_session(d / "dyn.onnx") as s:
        r = classify_files(s, photo_files[:1], topk=1)[0]
    doc = classify_files.__doc__
    for key in [*r, *r["top"][0], "on_error", "progress", "topk", "batch", "names"]:
        assert f'"{key}"' in doc or f"{key}:" in doc or f"``{key}``" in doc, key
