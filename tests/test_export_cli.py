"""cvig-export and cvig-compare command lines: the main job, reports, and every bad-input case."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import clustervig
from clustervig.export.cli import main as export_main
from clustervig.export.compare import main as compare_main
from clustervig.preprocess import sample_photographs, transform_spec
from clustervig.train import WEIGHTS_DIR


@pytest.fixture(scope="module")
def exported(tmp_path_factory, nano_ckpt):
    out = tmp_path_factory.mktemp("out")
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano_ckpt), "--fp16", "--dynamic-batch", "1:2:4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_export_writes_artifacts_and_report(exported):
    out, res = exported
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "model_fp16.json", "model_fp16.onnx", "model_fp32.json",
                                                     "model_fp32.onnx", "preprocess.json", "report.json"]
    report = json.loads((out / "report.json").read_text())
    # sidecars for runtimes that do not read ONNX: flat preprocessing spec, class names, metadata per precision
    cfg = clustervig.get_config("cvig_nano")
    assert json.loads((out / "preprocess.json").read_text()) == {**transform_spec(cfg), "normalize_in_graph": False}
    labels = (out / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[207] == "golden retriever"
    for name in ("fp32", "fp16"):
        meta = {p.key: p.value for p in onnx.load(str(out / f"model_{name}.onnx")).metadata_props}
        assert json.loads((out / f"model_{name}.json").read_text()) == meta
        assert meta["clustervig.precision"] == name
    assert sorted(report["sidecars"]) == ["labels.txt", "model_fp16.json", "model_fp32.json", "preprocess.json"]
    val = report["validation"]["results"]
    assert val["photos"]["fp32 vs pytorch"]["max_abs_diff"] <= 1e-4
    assert val["photos"]["fp32 vs pytorch"]["top1_agreement"] == 1.0
    for key in ("cosine_min", "label_agreement", "neighbor_agreement", "top1_agreement"):
        assert 0.0 <= val["photos"]["fp16 vs fp32"][key] <= 1.0 + 1e-9
    assert report["artifacts"]["fp16"]["precision_of_compute_ops"]["Conv"]["fp32"] == 0
    assert report["artifacts"]["fp32"]["nodes"] > 1000 and report["artifacts"]["fp32"]["bytes"] > 0
    assert set(report["timings_s"]) >= {"export_fp32", "export_fp16", "validate"}
    assert "TensorRT is not installed here" in res.output and "--engine" not in res.output  # the default
    for name in ("fp32", "fp16"):  # one trtexec line per artifact written
        assert f"trtexec --onnx={out / f'model_{name}.onnx'} --saveEngine={out / f'model_{name}.plan'}" in res.output
    assert res.output.count("--noTF32") == 2  # FP32 islands must not silently run in TF32
    assert "fp32 vs pytorch" in res.output  # summary table printed
    # FP16 error as a GPU would see it (per-op rounding), next to ONNX Runtime's own FP16 run
    emu = val["photos"]["fp16-emulated vs fp32"]
    assert 0.0 <= emu["label_agreement"] <= 1.0 and len(emu["label_agreement_per_block"]) == 3
    assert emu["max_abs_diff"] > 0.0
    for name in ("fp32", "fp16"):
        assert report["artifacts"][name]["tensorrt_op_issues"] == []


def test_export_from_digits_checkpoint_without_model_name(tmp_path):
    res = CliRunner().invoke(export_main, ["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--batch", "4",
                                           "--no-engine", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    g = onnx.load(str(tmp_path / "model_fp32.onnx"))
    assert [d.dim_value for d in g.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["class_names"] == [str(i) for i in range(10)]
    assert (tmp_path / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert json.loads((tmp_path / "preprocess.json").read_text())["img_size"] == 32


def test_static_batch_1_random_weights_validate_on_every_photo(tmp_path):
    # batch 1 once meant BatchNorm calibrated on one image (head BN variance 0,
    # logits all ~0, cosine meaningless) and validation on that single image
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--batch", "1", "--no-engine", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["validation"]["inputs"]["photos"][0] == 4
    r = report["validation"]["results"]["photos"]["fp32 vs pytorch"]
    assert r["cosine_min"] >= 0.999 and r["top1_agreement"] == 1.0
    # and the logits are not degenerate: a model calibrated on one image gives ~0 logits
    import onnxruntime as ort
    photos = sample_photographs(transform_spec(clustervig.get_config("cvig_nano")))
    sess = ort.InferenceSession(str(tmp_path / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"images": photos[:1].numpy()})[0]
    assert logits.std() > 0.05, logits.std()


def test_random_weights_are_loudly_warned(tmp_path):
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "--no-engine", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "RANDOM weights" in res.output
    assert json.loads((tmp_path / "report.json").read_text())["random_weights"] is True


def test_random_weights_are_reproducible_by_seed(tmp_path):
    def weights(seed, d):
        res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--seed", str(seed), "--no-validate",
                                               "--no-engine", "-o", str(tmp_path / d)])
        assert res.exit_code == 0, res.output
        g = onnx.load(str(tmp_path / d / "model_fp32.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    a, b, c = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(a[k].shape == c[k].shape and not (a[k] == c[k]).all() for k in a)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--model", "cvig_huge"], 2, "Invalid value for '--model'"),
        (["--model", "cvig_nano", "--checkpoint", "missing.pth"], 1, "does not exist"),
        (["--model", "cvig_nano", "--opset", "13"], 1, "opset 13 is too low"),
        (["--model", "cvig_nano", "--batch", "2", "--dynamic-batch", "1:2:4"], 2, "not both"),
        (["--model", "cvig_nano", "--dynamic-batch", "4:2:1"], 2, "MIN <= OPT <= MAX"),
        ([], 2, "give --model NAME"),
        (["--model", "cvig_nano", "--fp16", "--fp32-islands", "norm,bogus"], 2, "unknown piece 'bogus'; choose from"),
        (["--model", "cvig_nano", "--knn", "masked", "--capacity", "3"], 2, "--knn masked has no partition capacity"),
        (["--model", "cvig_nano", "--capacity", "3"], 2, "uses the masked one with --knn auto; add --knn padded"),
        (["--model", "cvig_nano", "--checkpoint", "."], 1, "is a directory, not a file"),
        (["--model", "cvig_nano", "--int8", "--calib-dir", "{tmp}"], 1, "holds no JPEG/PNG images"),
        (["--model", "cvig_nano", "--timing-cache", "/proc/cvig.cache"], 2, "cannot be written"),
    ],
)
def test_bad_input(tmp_path, args, code, message):
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(export_main, args + ["-o", str(out)])
    assert res.exit_code == code, res.output
    assert message in res.output and "Traceback" not in res.output
    assert "[2/" not in res.output  # refused before the export started
    assert not out.exists() or not any(p.suffix in (".onnx", ".json", ".plan") for p in out.rglob("*"))


def test_mismatched_checkpoint_names_the_recorded_variant(tmp_path, nano_ckpt):
    # a clustervig checkpoint records its variant: the error says so instead of dumping keys
    res = CliRunner().invoke(export_main, ["--model", "cvig_ti", "--checkpoint", str(nano_ckpt), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "holds a cvig_nano model (recorded in the file), not cvig_ti" in res.output
    assert "missing keys" not in res.output and "Traceback" not in res.output and len(res.output) < 600
    # a plain state_dict records nothing: the keys are listed, the hint comes first and speaks in flags
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(nano_ckpt, weights_only=True)["model"], plain)
    res = CliRunner().invoke(export_main, ["--model", "cvig_ti", "--checkpoint", str(plain), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "missing keys" in res.output and "shape mismatches" in res.output and "Traceback" not in res.output
    assert res.output.index("hint:") < res.output.index("missing keys") and len(res.output) < 3000
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--num-classes", "7", "--checkpoint", str(plain),
                                           "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--num-classes 1000 on the command line" in res.output


def test_num_classes_contradicting_the_checkpoint_is_an_error(tmp_path):
    digits = WEIGHTS_DIR / "cvig_digits.pth"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(digits), "--num-classes", "1000", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "has 10 classes (recorded in the file), not --num-classes 1000" in res.output
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(export_main, ["--checkpoint", str(digits), "--model", "cvig_ti", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "holds a cvig_digits model" in res.output


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--checkpoint", str(bad), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "could not be read" in res.output


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "-o", str(blocker / "out")])
    assert res.exit_code == 2 and "is not a folder" in res.output


def test_no_partial_artifacts_when_a_stage_fails(tmp_path, monkeypatch, nano_ckpt):
    import clustervig.export.cli as cli

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the FP16 stage")

    monkeypatch.setattr(cli, "convert_fp16", boom)
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano_ckpt), "--fp16", "-o", str(tmp_path)])
    assert res.exit_code != 0
    assert list(tmp_path.iterdir()) == []  # FP32 ONNX was staged, never published


def test_compare_passes_then_fails_on_corrupted_weight(tmp_path, exported, nano_ckpt):
    out, _ = exported
    res = CliRunner().invoke(compare_main, [str(out / "model_fp32.onnx"), "--checkpoint", str(nano_ckpt)])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output
    g = onnx.load(str(out / "model_fp32.onnx"))
    conv_w = next(t for t in g.graph.initializer if len(t.dims) == 4 and t.dims[0] > 16)
    arr = numpy_helper.to_array(conv_w).copy()
    arr.flat[0] += 0.5  # one corrupted weight
    conv_w.CopyFrom(numpy_helper.from_array(arr, conv_w.name))
    onnx.save(g, str(tmp_path / "corrupt.onnx"))
    res = CliRunner().invoke(compare_main, [str(tmp_path / "corrupt.onnx"), "--checkpoint", str(nano_ckpt)])
    assert res.exit_code == 1
    assert "FAILED" in res.output


def test_compare_needs_two_runners(exported):
    out, _ = exported
    res = CliRunner().invoke(compare_main, [str(out / "model_fp32.onnx")])
    assert res.exit_code == 2 and "at least two" in res.output


def test_polygraphy_command_line_from_readme(tmp_path, exported):
    out, _ = exported
    poly = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    ref = tmp_path / "fp32_outputs.json"
    cmd1 = [poly, "run", str(out / "model_fp32.onnx"), "--onnxrt", "--input-shapes", "images:[2,3,224,224]",
            "--save-outputs", str(ref)]
    r1 = subprocess.run(cmd1, capture_output=True, text=True)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    cmd2 = [poly, "run", str(out / "model_fp32.onnx"), "--onnxrt", "--input-shapes", "images:[2,3,224,224]",
            "--load-outputs", str(ref), "--atol", "1e-4", "--rtol", "1e-4"]
    r2 = subprocess.run(cmd2, capture_output=True, text=True)
    assert r2.returncode == 0 and "PASSED" in (r2.stdout + r2.stderr)


def test_fp16_export_with_normalization_in_the_graph_validates(tmp_path):
    # tensor names of a normalize-in-graph export carry the wrapper's "model." prefix: the FP16 emulation
    # used to name nodes after them, and the validation took those for a DEGC scope and crashed
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--fp16", "--normalize-in-graph", "--no-engine",
                                    "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["artifacts"]["fp16"]["tensorrt_op_issues"] == [] == report["artifacts"]["fp16"]["tensorrt_op_warnings"]
    val = report["validation"]["results"]["photos"]
    assert val["fp32 vs pytorch"]["max_abs_diff"] <= 1e-4  # the graph's own normalisation, fed [0, 1] images
    assert len(val["fp16-emulated vs fp32"]["label_agreement_per_block"]) == 3


def _snapshot(folder):
    """Every entry of ``folder`` (hidden ones included) with the SHA-256 of each file."""
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def digits_int8_export(tmp_path_factory):
    """A complete digits export with INT8 (calibration cache) and the user's own file beside it."""
    from clustervig.data import digits_split, write_image_folder

    root = tmp_path_factory.mktemp("earlier")
    train, _ = digits_split()
    calib = write_image_folder(train, root / "calib", per_class=1)
    out = root / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--fp16", "--int8",
                                           "--calib-dir", str(calib), "--calib-method", "max", "--no-validate", "-o", str(out)])
    assert res.exit_code == 0, res.output
    (out / "my_notes.txt").write_text("the user's file\n")
    return root, out


def test_export_replaces_an_earlier_export_as_a_whole(tmp_path, digits_int8_export):
    _, earlier = digits_int8_export
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = set(p.name for p in out.iterdir())
    assert {"model_int8.onnx", "model_int8.json", "calibration_cache.json", "labels.txt"} <= before
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    now = set(p.name for p in out.iterdir())
    # exactly the new export's files, plus the user's own file
    assert now == set(report["files"]) | {"my_notes.txt"}
    assert not {"model_int8.onnx", "model_int8.json", "model_fp16.onnx", "model_fp16.json", "calibration_cache.json"} & now
    assert "removed its calibration_cache.json, model_fp16.json, model_fp16.onnx, model_int8.json, model_int8.onnx" \
        in res.output
    assert (out / "labels.txt").read_text().splitlines()[0] == "tench"  # the new model's names, not the digits'
    assert (out / "my_notes.txt").read_text() == "the user's file\n"
    # a report.json that is not an export's: the folder is someone else's, refused before any work
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text('{"quarterly": 3}')
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "-o", str(other)])
    assert res.exit_code == 2 and "did not write" in res.output and "[1/" not in res.output


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_export_leaves_the_folder_as_it_was(tmp_path, digits_int8_export, sig):
    """Ctrl-C or kill during a re-export (other calibration images, so a new cache would be written):
    the folder keeps the earlier export byte for byte, and no staging folder is left."""
    import signal

    from clustervig.data import Split, digits_split, write_image_folder

    root, earlier = digits_int8_export
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = _snapshot(out)
    train, _ = digits_split()
    calib2 = write_image_folder(Split(train.images[500:], train.labels[500:], train.raw[500:]), tmp_path / "calib2",
                                per_class=1)
    proc = subprocess.Popen([sys.executable, "-m", "clustervig.export.cli", "--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"),
                             "--int8", "--calib-dir", str(calib2), "--calib-method", "max", "-o", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            # the child must take Ctrl-C even when the suite runs in the background (`nohup ... &`
                            # starts it with SIGINT ignored, and an ignored signal stays ignored across exec)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # the validation starts after the INT8 calibration finished
        seen.append(line)
        if "validating against" in line:
            assert any(p.name.startswith(".cvig-export-") for p in out.iterdir())  # the staging folder exists now
            proc.send_signal(getattr(signal, sig))
            break
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == (130 if sig == "SIGINT" else 143), "".join(seen) + rest
    assert "is as it was" in rest
    assert _snapshot(out) == before


def test_compare_uses_the_recorded_preprocessing(digits_int8_export):
    """The README's FP32-vs-FP16 line on the README's digits export: inputs preprocessed as the digits
    model records (32 px, mean/std 0.5), not the ImageNet way."""
    _, out = digits_int8_export
    res = CliRunner().invoke(compare_main, [str(out / "model_fp32.onnx"), str(out / "model_fp16.onnx"),
                                            "--atol", "0.05", "--rtol", "0.05"])
    assert res.exit_code == 0 and "PASSED" in res.output, res.output
    res = CliRunner().invoke(compare_main, [str(out / "model_fp32.onnx"), "--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth")])
    assert res.exit_code == 0 and "PASSED" in res.output, res.output


def test_compare_refuses_artifacts_of_different_models(digits_int8_export, exported, nano_ckpt):
    _, digits = digits_int8_export
    nano, _ = exported
    res = CliRunner().invoke(compare_main, [str(digits / "model_fp32.onnx"), str(nano / "model_fp32.onnx")])
    assert res.exit_code == 1 and "takes 32x32 images" in res.output and "224x224" in res.output, res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(compare_main, [str(nano / "model_fp32.onnx"), "--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth")])
    assert res.exit_code == 1 and "the checkpoint is cvig_digits" in res.output and "cvig_nano" in res.output, res.output
    res = CliRunner().invoke(compare_main, [str(digits / "model_fp32.onnx"), "--checkpoint", str(nano_ckpt)])
    assert res.exit_code == 1 and "the checkpoint is cvig_nano" in res.output, res.output


def test_polygraphy_fp16_lines_from_readme_on_the_digits_export(tmp_path, digits_int8_export):
    _, out = digits_int8_export
    poly = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    ref = tmp_path / "fp32_outputs.json"
    common = ["--onnxrt", "--input-shapes", "images:[1,3,32,32]", "--val-range", "images:[-1,1]"]
    r1 = subprocess.run([poly, "run", str(out / "model_fp32.onnx"), *common, "--save-outputs", str(ref)],
                        capture_output=True, text=True)
    assert r1.returncode == 0, r1.stdout + r1.stderr
    r2 = subprocess.run([poly, "run", str(out / "model_fp16.onnx"), *common, "--load-outputs", str(ref),
                         "--atol", "0.05", "--rtol", "0.05"], capture_output=True, text=True)
    assert r2.returncode == 0 and "PASSED" in (r2.stdout + r2.stderr), r2.stdout + r2.stderr
