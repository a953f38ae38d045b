"""cvig export's report.json and messages: versions and time, paths that do not depend on the working directory,
custom model sizes named as such, calibration images checked before any work, gate lines that read true."""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clustervig.export.cli import main as export_main
from clustervig.export.gates import DEFAULT_GATES, capacity_gates, check_gates, effective_gates
from clustervig.train import WEIGHTS_DIR

DIGITS = WEIGHTS_DIR / "cvig_digits.pth"
FIX = Path(__file__).parent / "fixtures" / "authors"


def test_report_has_time_versions_and_paths_relative_to_its_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(DIGITS, work / "digits.pth")
    monkeypatch.chdir(work)  # relative paths on the command line
    t0 = time.time()
    res = CliRunner().invoke(export_main, ["--checkpoint", "digits.pth", "--fp16", "--samples", "1", "--no-engine",
                                           "-o", "out"])
    t1 = time.time()
    assert res.exit_code == 0, res.output
    report = json.loads((work / "out" / "report.json").read_text())
    created = time.mktime(time.strptime(report["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone  # UTC
    assert int(t0) - 1 <= created <= t1 + 1
    import onnx
    import onnxruntime
    import torch

    assert report["versions"] == {"clustervig-trt": importlib.metadata.version("clustervig-trt"),
                                  "python": __import__("platform").python_version(), "torch": torch.__version__,
                                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    assert report["checkpoint"] == str((work / "digits.pth").resolve())  # outside the folder: absolute
    # the folder can be moved, and read from anywhere: artifacts are named relative to the report's folder
    moved = tmp_path / "elsewhere" / "export"
    shutil.move(str(work / "out"), str(moved))
    monkeypatch.chdir(tmp_path)
    assert set(report["artifacts"]) == {"fp32", "fp16"}
    for name, art in report["artifacts"].items():
        assert art["path"] == f"model_{name}.onnx"
        assert (moved / art["path"]).stat().st_size == art["bytes"]
    assert report["model"]["name"] == "cvig_digits" and "custom" not in report["model"]
    assert "model: cvig_digits" in res.output


def test_a_failed_gates_report_names_its_artifacts_relative_to_its_folder(tmp_path):
    res = CliRunner().invoke(export_main, ["--model", "cvig_digits", "--gate", "fp32.cosine=1", "--samples", "1",
                                           "--no-engine", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    failed = next((tmp_path / "o").iterdir())
    report = json.loads((failed / "report.json").read_text())
    assert report["artifacts"]["fp32"]["path"] == "model_fp32.onnx" and report["failed_dir"] == str(failed.resolve())
    assert (failed / "model_fp32.onnx").stat().st_size == report["artifacts"]["fp32"]["bytes"]


def test_a_converted_custom_size_is_named_custom(tmp_path):
    from clustervig.convert import command as convert

    ck = tmp_path / "small.pth"
    res = CliRunner().invoke(convert, ["--from", "authors", str(FIX / "authors_small_state.pth"), "--config",
                                       str(FIX / "config.json"), "-o", str(ck)])
    assert res.exit_code == 0, res.output
    recorded = __import__("torch").load(ck, weights_only=True)["config"]
    assert recorded["name"] == "cvig_ti"  # cvig convert records the base variant with the sizes as overrides
    res = CliRunner().invoke(export_main, ["--checkpoint", str(ck), "--samples", "1", "--no-engine",
                                           "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    model = json.loads((tmp_path / "out" / "report.json").read_text())["model"]
    assert model["name"] == "custom" and model["base"] == "cvig_ti"
    # the sizes that make it another model than cvig_ti (dim 192, depth 12, grid 14, 224 px), as recorded
    assert {k: model["custom"][k] for k in ("dim", "depth", "grid", "img_size")} == {"dim": 64, "depth": 2, "grid": 8,
                                                                                     "img_size": 64}
    assert all(model["custom"][k] == recorded[k] == model[k] for k in model["custom"])
    line = next(x for x in res.output.splitlines() if x.startswith("model: "))
    assert line.startswith("model: custom (") and "dim=64" in line and "depth=2" in line
    assert "cvig_ti," not in res.output  # the build step names it custom too


def _calib_folder(folder: Path, n: int = 8) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("option", ["--int8", "--fp16"])
def test_calibration_images_are_checked_before_any_work(tmp_path, option):
    calib = _calib_folder(tmp_path / "calib")
    (calib / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")  # a PNG header and nothing usable
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), option, "--calib-dir", str(calib),
                                           "--calib-samples", "8", "--no-engine", "-o", str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    errors = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "calibration image unusable" in errors[0] and str(calib / "img3.png") in errors[0]
    assert "[1/" not in res.output  # refused before the model was even built
    assert not (tmp_path / "out").exists()


def _gate_numbers(line: str, sign: str):
    """The two numbers either side of ``sign`` ('<' or '>') at the end of a gate line, as printed."""
    m = re.search(r"(\S+?)%? " + re.escape(sign) + r" (\S+?)%?$", line)
    assert m, line
    return Decimal(m.group(1)), Decimal(m.group(2))


def _cmp(cosine, top1):
    return {"max_abs_diff": 0.0, "cosine_min": cosine, "top1_agreement": top1, "images": 4}


@pytest.mark.parametrize("cosine,threshold", [(0.99999996, 0.99999999), (0.999996, 0.99999999), (0.9999, 0.99995),
                                              (0.98999999, 0.99)])
def test_a_failed_cosine_gate_line_reads_true(cosine, threshold):
    gates = effective_gates({"fp32.cosine": threshold}, random_weights=False)
    res = check_gates({"results": {"photos": {"fp32 vs pytorch": _cmp(cosine, 1.0)}}}, gates)
    (line,) = [r["reason"] for r in res if not r["passed"]]
    shown, want = _gate_numbers(line, "<")
    assert want == Decimal(repr(threshold))  # the threshold as given, not rounded to 1
    assert shown < want and abs(float(shown) - cosine) < 1e-6


@pytest.mark.parametrize("top1,threshold", [(0.754999, 0.755), (0.75, 0.99999999), (0.9999999, 0.99999999 + 1e-9)])
def test_a_failed_top1_gate_line_reads_true(top1, threshold):
    gates = effective_gates({"fp32.top1": threshold}, random_weights=False)
    res = check_gates({"results": {"photos": {"fp32 vs pytorch": _cmp(1.0, top1)}}}, gates)
    (line,) = [r["reason"] for r in res if not r["passed"]]
    shown, want = _gate_numbers(line, "<")
    assert want == Decimal(repr(threshold)) * 100 and shown < want and shown != 100


def test_a_failed_accuracy_drop_line_reads_true():
    gates = effective_gates({}, random_weights=False)
    acc = {"images": 100000, "top1": {"pytorch": 0.9, "fp32": 0.9 - 0.0050001}}
    res = check_gates({"results": {}, "accuracy": {"held-out": acc}}, gates)
    (line,) = [r["reason"] for r in res if not r["passed"]]
    m = re.search(r"is (\S+) points below .* \(allowed (\S+)\)$", line)
    assert m, line
    assert Decimal(m.group(1)) > Decimal(m.group(2)) == Decimal("0.5"), line  # "0.50 ... (allowed 0.5)" was printed


def test_capacity_gate_compares_the_overflow_fraction():
    assert DEFAULT_GATES["capacity.overflow"] == 0.05
    gates = effective_gates({}, random_weights=True)  # applies to random weights too
    cap = {"capacity": 40, "sets": {
        "photos": {"overflow_at_capacity": 118, "slots": 2352, "overflow_fraction": 118 / 2352},  # 5.02 %
        "random": {"overflow_at_capacity": 117, "slots": 2352, "overflow_fraction": 117 / 2352}}}  # 4.97 %
    res = {r["inputs"]: r for r in capacity_gates(cap, gates)}
    assert not res["photos"]["passed"] and res["random"]["passed"]
    shown, want = _gate_numbers(res["photos"]["reason"], ">")
    assert want == 5 and shown > want and "118 of 2352 token-block slots" in res["photos"]["reason"]
    assert capacity_gates(cap, effective_gates({"capacity.overflow": None}, random_weights=False)) == []
    assert capacity_gates({"mode": "exact", "capacity": 196, "tokens": 196}, gates) == []
