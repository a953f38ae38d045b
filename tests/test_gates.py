"""Validation gates of cvig-export: thresholds, exit status, what is published, and a table that shows every flip."""
from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from clustervig.export.cli import main as export_main, summary_table
from clustervig.export.gates import (DEFAULT_GATES, GateError, check_gates, effective_gates, fmt_cosine, fmt_fraction,
                                     parse_gate, parse_gates)
from clustervig.train import WEIGHTS_DIR

DIGITS = WEIGHTS_DIR / "cvig_digits.pth"


def test_gate_parser():
    assert parse_gate("fp16.cosine=0.98") == ("fp16.cosine", 0.98)
    assert parse_gate(" int8.top1 = off ") == ("int8.top1", None)
    assert parse_gates(["fp32.top1=0.5", "fp32.top1=1"]) == {"fp32.top1": 1.0}  # the last one wins
    for spec, message in [("fp16.cos=0.9", "unknown key 'fp16.cos'"), ("bf16.cosine=0.9", "unknown key"),
                          ("fp16.cosine", "expected KEY=VALUE"), ("fp16.cosine=high", "not a number"),
                          ("fp16.top1=1.5", "must lie in [0, 1]"), ("fp16.cosine=-2", "must lie in [-1, 1]")]:
        with pytest.raises(GateError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_gate(spec)
    # random weights: fp16/int8 check finiteness only, unless a threshold is given explicitly
    g = effective_gates({"int8.cosine": 0.5}, random_weights=True)
    assert g["fp16.cosine"]["threshold"] is None and g["int8.cosine"]["threshold"] == 0.5
    assert g["fp32.cosine"]["threshold"] == DEFAULT_GATES["fp32.cosine"] == 0.9999
    assert effective_gates({}, random_weights=False)["fp16.cosine"]["threshold"] == 0.9


def test_cli_refuses_unknown_gate_keys(tmp_path):
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--gate", "fp16.cos=0.9", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "unknown key 'fp16.cos'" in res.output and "fp16.cosine" in res.output  # the known keys are listed
    assert not (tmp_path / "o").exists()


def test_fractions_never_round_to_100_or_0():
    assert fmt_fraction(0.99998) == "99.998%"
    assert fmt_fraction(1 - 1e-7) == "99.99999%"
    assert fmt_fraction(2e-5) == "0.002%"
    assert fmt_fraction(1.0) == "100%" and fmt_fraction(0.0) == "0%" and fmt_fraction(0.75) == "75.00%"
    assert fmt_fraction(0.75, 0) == "75%" and fmt_fraction(0.99998, 0) == "99.998%"
    assert fmt_cosine(0.9999996) == "0.9999996" and fmt_cosine(1.0) == "1.000000" and fmt_cosine(0.5) == "0.500000"
    r = {"max_abs_diff": 0.01, "cosine_min": 0.999, "cosine_mean": 0.9995, "top1_agreement": 0.99998,
         "label_agreement": 0.99998, "neighbor_agreement": 1.0, "images": 50000, "nonfinite_images": 0}
    report = {"artifacts": {"fp32": {"nodes": 10, "bytes": 2**20}, "fp16": {"nodes": 12, "bytes": 2**19}},
              "validation": {"results": {"photos": {"fp16 vs fp32": r}}}, "timings_s": {"validate": 1.0}}
    gates = effective_gates({"fp16.top1": 1.0}, random_weights=False)
    results = check_gates(report["validation"], gates)
    report["gates"] = {"enforced": True, "thresholds": gates, "results": results,
                       "failed": [x["reason"] for x in results if not x["passed"]]}
    assert report["gates"]["failed"] == ["fp16.top1: fp16 vs fp32 on photos: top-1 agreement 99.998% < 100%"]
    table = summary_table(report)
    row = next(line for line in table.splitlines() if line.startswith("photos"))
    assert row.split()[-4:] == ["99.998%", "99.998%", "100%", "FAIL"] and "100.00%" not in table
    assert "gates (1 FAILED)" in table


EARLIER_REPORT = '{"artifacts": {"fp32": {"path": "model_fp32.onnx"}}, "files": ["model_fp32.onnx", "report.json"]}'


@pytest.fixture(scope="module")
def failing(tmp_path_factory):
    """An impossible FP16 threshold, into a folder that holds an earlier export."""
    out = tmp_path_factory.mktemp("fail")
    (out / "model_fp32.onnx").write_bytes(b"earlier export")
    (out / "report.json").write_text(EARLIER_REPORT)
    res = CliRunner().invoke(export_main, ["--model", "cvig_digits", "--fp16", "--gate", "fp16.cosine=1", "--samples", "1",
                                           "--no-engine", "-o", str(out)])
    return out, res


def test_gate_failure_exits_nonzero_and_publishes_nothing(failing):
    out, res = failing
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("GATE FAILED")]
    assert lines and all(line.startswith("GATE FAILED fp16.cosine: fp16") and "< 1" in line for line in lines)
    assert "nothing published" in res.output
    # the earlier export is untouched; this one's files are kept apart for inspection
    assert (out / "model_fp32.onnx").read_bytes() == b"earlier export" and (out / "report.json").read_text() == EARLIER_REPORT
    failed = [p for p in out.iterdir() if p.is_dir()]
    assert len(failed) == 1 and failed[0].name.startswith("failed-") and str(failed[0]) in res.output
    assert sorted(p.name for p in failed[0].iterdir()) == ["model_fp16.onnx", "model_fp32.onnx", "report.json"]
    report = json.loads((failed[0] / "report.json").read_text())
    assert report["published"] is False and report["gates"]["enforced"] is True
    assert report["gates"]["failed"] == [line[len("GATE FAILED "):] for line in lines]
    assert report["artifacts"]["fp16"]["path"] == "model_fp16.onnx"  # relative to its report's folder
    assert "FAIL" in res.output and "gates (" in res.output  # the table is printed as well


def test_no_gates_publishes_with_a_warning(tmp_path, failing):
    _, failed_res = failing
    res = CliRunner().invoke(export_main, ["--model", "cvig_digits", "--fp16", "--gate", "fp16.cosine=1", "--samples", "1",
                                           "--no-gates", "--no-engine", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "WARNING: --no-gates" in res.output
    assert "WARNING: gate failed (--no-gates: published anyway): fp16.cosine" in res.output
    assert (tmp_path / "model_fp16.onnx").is_file() and not any(p.name.startswith("failed-") for p in tmp_path.iterdir())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["published"] is True and report["gates"]["enforced"] is False and report["gates"]["failed"]


def test_trained_export_passes_and_a_corrupted_artifact_fails(tmp_path, monkeypatch):
    ok = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--fp16", "--samples", "2", "--no-engine",
                                          "-o", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["gates"]["failed"] == [] and report["fp16_range_analysis"]["kept_fp32"] == []
    judged = {(r["gate"], r["comparison"], r["inputs"]) for r in report["gates"]["results"]}
    for s in ("photos", "random"):  # every artifact on every input set, FP16 also as a GPU rounds it
        assert {("fp32.cosine", "fp32 vs pytorch", s), ("fp32.top1", "fp32 vs pytorch", s),
                ("fp16.finite", "fp16 vs fp32", s), ("fp16.cosine", "fp16-emulated vs fp32", s)} <= judged
    assert "gates (all passed)" in ok.output

    import clustervig.export.cli as cli

    real = cli.export_onnx

    def corrupted(model, path, *a, **k):  # the FP32 file gets one wrong convolution weight
        real(model, path, *a, **k)
        g = onnx.load(str(path))
        w = next(t for t in g.graph.initializer if len(t.dims) == 4 and t.dims[0] >= 32)
        arr = numpy_helper.to_array(w).copy()
        arr.flat[0] += 0.5
        w.CopyFrom(numpy_helper.from_array(arr, w.name))
        onnx.save(g, str(path))
        return g

    monkeypatch.setattr(cli, "export_onnx", corrupted)
    bad = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--samples", "2", "--no-engine",
                                           "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1, bad.output
    assert "GATE FAILED fp32.cosine: fp32 vs pytorch on photos: cosine min" in bad.output
    assert [p.name[:7] for p in (tmp_path / "bad").iterdir()] == ["failed-"]


def test_normalize_in_graph_is_validated_on_the_images_it_takes(tmp_path):
    # the graph normalises itself: validation feeds it RGB in [0, 1] (it fed it normalised images,
    # normalised twice over: cosine -0.06 vs PyTorch, which the FP32 gate now refuses)
    res = CliRunner().invoke(export_main, ["--model", "cvig_digits", "--normalize-in-graph", "--samples", "1",
                                           "--no-engine", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "report.json").read_text())["validation"]["results"]
    assert all(r[s]["fp32 vs pytorch"]["max_abs_diff"] <= 1e-4 for s in ("photos", "random"))
