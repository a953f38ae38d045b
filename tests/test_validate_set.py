"""cvig export --validate-set: labelled held-out images, top-1 accuracy of every artifact in the report, accuracy gates."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import clustervig
from clustervig.data import digits_split, write_image_folder
from clustervig.export.cli import main as export_main, summary_table
from clustervig.export.gates import check_gates, effective_gates
from clustervig.export.validate_sets import ValidateSetError, load_validate_set, round_robin
from clustervig.photo_data import SOURCES, photo_patches_split
from clustervig.train import WEIGHTS_DIR

DIGITS = WEIGHTS_DIR / "cvig_digits.pth"


def test_round_robin_takes_each_class_in_turn():
    labels = np.array([2, 0, 0, 1, 2, 0, 1, 2, 2])
    order = round_robin(labels)
    assert sorted(order.tolist()) == list(range(len(labels)))
    # brute force: the i-th image of each class (in set order) comes before any (i+1)-th, classes ascending
    seen = {}
    expected = []
    for i, c in enumerate(labels):
        expected.append((seen.get(c, 0), c, i))
        seen[c] = seen.get(c, 0) + 1
    assert order.tolist() == [i for _, _, i in sorted(expected)]
    assert labels[order[:3]].tolist() == [0, 1, 2]


def test_builtin_sets_are_the_recipes_held_out_splits():
    cfg = clustervig.get_config("cvig_digits")
    s = load_validate_set("digits", cfg, {"split_seed": 0, "test_size": 0.2}, limit=30, multiple=4)
    assert len(s.labels) == 28 and s.available == 360  # a multiple of the static batch
    _, test = digits_split(cfg.img_size, cfg.mean, cfg.std, 0.2, 0)
    y = test.labels.numpy()
    pick = np.sort(round_robin(y)[:28])
    assert np.array_equal(s.labels, y[pick]) and torch.equal(s.images, test.images[pick])
    assert np.bincount(s.labels, minlength=10).min() >= 2  # every class in a slice of 28

    cfg = clustervig.get_config("cvig_photos")
    s = load_validate_set("photo-patches", cfg, {"data_seed": 3, "test_per_class": 2}, limit=0)
    _, test = photo_patches_split(1, 2, cfg.img_size, 3, cfg.mean, cfg.std)
    assert np.array_equal(s.labels, test.labels.numpy()) and torch.equal(s.images, test.images)
    assert s.describe() == {"name": "photo-patches", "source": s.source, "images": 32, "available": 32, "classes": 16}


def test_sets_that_do_not_fit_the_model_are_refused(tmp_path):
    with pytest.raises(ValidateSetError, match=r"photo-patches scores 16 classes.*cvig_digits has 10 classes"):
        load_validate_set("photo-patches", clustervig.get_config("cvig_digits"))
    with pytest.raises(ValidateSetError, match="digits scores 10 classes"):
        load_validate_set("digits", clustervig.get_config("cvig_photos"))
    with pytest.raises(ValidateSetError, match="fewer than one batch of 8"):
        load_validate_set("digits", clustervig.get_config("cvig_digits"), limit=5, multiple=8)
    _, test = digits_split()
    write_image_folder(test, tmp_path / "f", per_class=1)
    (tmp_path / "f" / "3").rename(tmp_path / "f" / "three")
    with pytest.raises(ValidateSetError, match="'three' is neither one of the model's class names"):
        load_validate_set(str(tmp_path / "f"), clustervig.get_config("cvig_digits"))
    write_image_folder(test, tmp_path / "g", per_class=1)
    (tmp_path / "g" / "9").rename(tmp_path / "g" / "12")
    with pytest.raises(ValidateSetError, match="class index 12 is out of range for a model with 10 classes"):
        load_validate_set(str(tmp_path / "g"), clustervig.get_config("cvig_digits"))


def test_a_folder_reads_class_names_and_indices(tmp_path):
    cfg = clustervig.get_config("cvig_photos")
    _, test = photo_patches_split(1, 1, 64, 1)
    write_image_folder(test, tmp_path / "f", names=[SOURCES[i] if i % 2 else str(i) for i in range(16)])
    s = load_validate_set(str(tmp_path / "f"), cfg)
    assert s.name == "labelled" and s.available == 16
    assert sorted(s.labels.tolist()) == list(range(16))
    assert s.images.shape == (16, 3, 224, 224)  # the model's own preprocessing (64-px crops resized)


def test_held_out_crops_saved_as_png_read_back_as_the_same_tensors(tmp_path):
    # cvig_photos' deployment preprocessing (crop_pct 1, bilinear) turns a 224-px crop file into exactly the
    # tensor it was trained / tested on: a folder of the held-out crops is the built-in set
    from clustervig.photo_data import write_photo_folder

    model = clustervig.create_model("cvig_photos", pretrained=WEIGHTS_DIR / "cvig_photos.pth")
    cfg = model.cfg
    assert (cfg.crop_pct, cfg.interpolation) == (1.0, "bilinear")
    builtin = load_validate_set("photo-patches", cfg, {"data_seed": 5, "test_per_class": 1})
    _, test = photo_patches_split(1, 1, cfg.img_size, 5, cfg.mean, cfg.std)
    folder = load_validate_set(str(write_photo_folder(test, tmp_path / "f")), cfg)
    assert np.array_equal(folder.labels, builtin.labels) and torch.equal(folder.images, builtin.images)


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("vs") / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--fp16", "--batch", "4", "--validate-set", "digits",
                                           "--validate-images", "42", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


def test_report_records_top1_of_pytorch_and_every_artifact(digits_export):
    out, res = digits_export
    report = json.loads((out / "report.json").read_text())
    val = report["validation"]
    assert val["labelled_set"]["name"] == "digits" and val["labelled_set"]["images"] == 40  # 42 -> 10 batches of 4
    acc = val["accuracy"]["digits"]
    assert acc["images"] == 40 and set(acc["top1"]) == {"pytorch", "fp32", "fp16", "fp16-emulated"}
    # independent: the same 40 scans through the checkpoint in PyTorch and the published FP32 graph in ORT
    model = clustervig.create_model("cvig_digits", pretrained=DIGITS).eval()
    _, test = digits_split(model.cfg.img_size, model.cfg.mean, model.cfg.std)
    y = test.labels.numpy()
    pick = np.sort(round_robin(y)[:40])
    x, y = test.images[pick], y[pick]
    with torch.no_grad():
        want = float((model(x).argmax(1).numpy() == y).mean())
    assert acc["top1"]["pytorch"] == pytest.approx(want, abs=1e-12)
    sess = ort.InferenceSession(str(out / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 4].numpy()})[0] for i in range(0, 40, 4)])
    assert acc["top1"]["fp32"] == pytest.approx(float((logits.argmax(1) == y).mean()), abs=1e-12)
    assert acc["top1"]["pytorch"] >= 0.95  # the trained digits model (99.72 % on all 360)
    # the labelled set is compared like the others, and judged by accuracy
    assert val["results"]["digits"]["fp32 vs pytorch"]["images"] == 40
    gates = {(g["gate"], g["inputs"]) for g in report["gates"]["results"]}
    assert ("fp32.accuracy_drop", "digits") in gates and ("fp16.accuracy_drop", "digits") in gates
    assert ("fp32.cosine", "digits") not in gates and ("fp32.cosine", "photos") in gates
    assert "top-1 accuracy on digits (40 labelled images): pytorch" in res.output


def test_cli_reads_a_folder_of_class_names(tmp_path):
    # a folder named by class names passes the early check (the names are known once the model is built)
    from clustervig.export.validate_sets import check_validate_set

    _, test = digits_split()
    folder = write_image_folder(test, tmp_path / "d", per_class=1, names=[f"n{i}" for i in range(10)])
    check_validate_set(str(folder))
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--validate-set", str(folder), "--no-engine",
                                           "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "'n0' is neither one of the model's class names (0, 1, 2" in res.output


def test_cli_folder_of_imagenet_names_on_a_1000_class_model(tmp_path):
    # a 1000-class model without recorded names: folders are ImageNet-1k names (as labels.txt), or indices
    from PIL import Image

    from clustervig.preprocess import load_batch, transform_spec

    rng = np.random.default_rng(0)
    for cls, n in (("tench", 2), ("goldfish", 1), ("207", 1)):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "f" / cls / f"{i}.png")
    torch.manual_seed(0)
    model = clustervig.create_model("cvig_nano").eval()
    ck = clustervig.save_checkpoint(model, tmp_path / "nano.pth")
    res = CliRunner().invoke(export_main, ["--checkpoint", str(ck), "--validate-set", str(tmp_path / "f"), "--validate-images",
                                           "0", "--no-engine", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    val = json.loads((tmp_path / "o" / "report.json").read_text())["validation"]
    files = sorted((tmp_path / "f").rglob("*.png"))
    y = np.array([{"207": 207, "goldfish": 1, "tench": 0}[f.parent.name] for f in files])
    with torch.no_grad():
        want = float((model(load_batch(files, transform_spec(model.cfg))).argmax(1).numpy() == y).mean())
    assert val["labelled_set"]["images"] == 4 and val["labelled_set"]["classes"] == 3
    assert val["accuracy"]["labelled"]["top1"]["pytorch"] == want


def test_cli_errors_name_the_fix(tmp_path):
    run = lambda *a: CliRunner().invoke(export_main, [*a, "-o", str(tmp_path / "o")])  # noqa: E731
    res = run("--checkpoint", str(DIGITS), "--validate-set", str(tmp_path / "nowhere"))
    assert res.exit_code == 2 and "does not exist" in res.output and "digits, photo-patches" in res.output
    res = run("--checkpoint", str(DIGITS), "--validate-images", "10")
    assert res.exit_code == 2 and "add --validate-set" in res.output
    res = run("--checkpoint", str(DIGITS), "--validate-set", "digits", "--no-validate")
    assert res.exit_code == 2 and "drop --no-validate" in res.output
    res = run("--checkpoint", str(DIGITS), "--validate-set", "photo-patches")
    assert res.exit_code == 1 and "scores 16 classes" in res.output and "DIR/<class name or index>/<image>" in res.output
    assert not (tmp_path / "o").exists()


def test_accuracy_gate_fails_on_a_drop_and_says_by_how_much():
    r = {"max_abs_diff": 0.5, "cosine_min": 0.5, "cosine_mean": 0.9, "top1_agreement": 0.9, "images": 50, "nonfinite_images": 0}
    validation = {"results": {"photos": {"fp16 vs fp32": dict(r)}, "labelled": {"fp16 vs fp32": dict(r), "fp32 vs pytorch": dict(r)}},
                  "accuracy": {"labelled": {"images": 50, "top1": {"pytorch": 0.9, "fp32": 0.9, "fp16": 0.86}}}}
    gates = effective_gates({}, random_weights=False)
    results = check_gates(validation, gates)
    failed = [x["reason"] for x in results if not x["passed"]]
    # photos: the image-by-image cosine gate; labelled: only the accuracy (fp32 0 drop passes, fp16 4 points fails)
    assert failed == ["fp16.cosine: fp16 vs fp32 on photos: cosine min 0.500000 < 0.9",
                      "fp16.accuracy_drop: fp16 vs fp32 on labelled (50 labelled images): top-1 accuracy 86.00% is "
                      "4.00 points below fp32's 90.00% (allowed 1)"]
    assert effective_gates({"fp16.accuracy_drop": 0.05}, False)["fp16.accuracy_drop"]["threshold"] == 0.05
    assert not [x for x in check_gates(validation, effective_gates({"fp16.accuracy_drop": 0.05, "fp16.cosine": None}, False))
                if not x["passed"]]
    report = {"artifacts": {"fp32": {"nodes": 1, "bytes": 1}, "fp16": {"nodes": 1, "bytes": 1}}, "validation": validation,
              "timings_s": {}, "gates": {"enforced": True, "thresholds": gates, "results": results, "failed": failed}}
    table = summary_table(report)
    assert "top-1 accuracy on labelled (50 labelled images): pytorch 90.00%, fp32 90.00%, fp16 86.00%" in table
    assert "accuracy drop<=1 pt" in table


def test_dataset_command_writes_the_recipes_splits(tmp_path):
    from clustervig.cli import cvig

    res = CliRunner().invoke(cvig, ["dataset", "digits", "--split", "test", "--per-class", "2", "-o", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [str(i) for i in range(10)]
    s = load_validate_set(str(tmp_path / "d"), clustervig.get_config("cvig_digits"))
    _, test = digits_split()
    y = test.labels.numpy()
    first2 = np.sort(np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)]))
    # written from the raw 8x8 scans, read back through the model's own preprocessing (the same 32-px upsampling)
    assert np.array_equal(np.sort(s.labels), np.sort(y[first2]))
    assert torch.allclose(s.images[np.argsort(s.labels, kind="stable")], test.images[first2][np.argsort(y[first2], kind="stable")],
                          atol=1e-6)
    # refused: a non-empty folder; nothing half-written when it fails
    res = CliRunner().invoke(cvig, ["dataset", "digits", "--split", "test", "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "not empty" in res.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
