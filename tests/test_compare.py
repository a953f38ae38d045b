"""cvig compare: every artifact against the first (the reference), and artifacts without a common batch refused.

The artifacts are the shipped digits model exported at static batch 1, static batch 2 and a dynamic 1:4:4
range (the same weights, so equal logits), and copies of the batch-1 graph whose logits are shifted by a
known constant (an Add before the output): their differences to the reference and to each other are known
exactly, independent of the comparison code.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from clustervig.cli import cvig
from clustervig.train import WEIGHTS_DIR

CKPT = WEIGHTS_DIR / "cvig_digits.pth"


def _export(out: Path, *args: str) -> Path:
    res = CliRunner().invoke(cvig, ["export", "--checkpoint", str(CKPT), "--no-validate", *args, "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out / "model_fp32.onnx"


def _shifted(src: Path, dst: Path, delta: float) -> Path:
    """``src`` with ``delta`` added to every logit (metadata kept: the same model for cvig compare)."""
    g = onnx.load(str(src))
    out = g.graph.output[0].name
    for node in g.graph.node:
        node.output[:] = [f"{out}_unshifted" if o == out else o for o in node.output]
    g.graph.initializer.append(numpy_helper.from_array(np.array(delta, np.float32), "logit_shift"))
    g.graph.node.append(helper.make_node("Add", [f"{out}_unshifted", "logit_shift"], [out], name="test/logit_shift"))
    onnx.save(g, str(dst))
    return dst


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    a = _export(tmp / "b1")
    return {
        "a": a,
        "b2": _export(tmp / "b2", "--batch", "2"),
        "dyn": _export(tmp / "dyn", "--dynamic-batch", "1:4:4"),
        "plus": _shifted(a, tmp / "plus.onnx", 0.075),
        "minus": _shifted(a, tmp / "minus.onnx", -0.075),
        "far": _shifted(a, tmp / "far.onnx", 0.2),
    }


def _compare(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(cvig, ["compare", *map(str, args)])


def _verdicts(output: str) -> dict:
    """'  onnxrt:X vs onnxrt:REF: PASSED (4/4 ...)' lines -> {X: verdict}"""
    return {m.group(1): m.group(3) for m in re.finditer(r"^  onnxrt:(\S+) vs onnxrt:(\S+): (PASSED|FAILED)", output, re.M)}


def test_each_artifact_is_compared_with_the_first(artifacts):
    """plus and minus are each 0.075 from the reference (within atol 0.1) but 0.15 from each other: compared with
    the reference both pass; neighbouring pairs (the old behaviour) would fail plus vs minus."""
    a, plus, minus, far = artifacts["a"], artifacts["plus"], artifacts["minus"], artifacts["far"]
    res = _compare(a, plus, minus, "--atol", "0.1", "--rtol", "0")
    assert res.exit_code == 0, res.output
    assert f"reference: onnxrt:{a.name}" in res.output
    assert _verdicts(res.output) == {"plus.onnx": "PASSED", "minus.onnx": "PASSED"}
    assert "plus.onnx vs onnxrt:minus.onnx" not in res.output and res.output.rstrip().endswith("PASSED")
    # one artifact 0.2 away: the run fails, and the line that fails names that artifact, the others pass
    res = _compare(a, plus, far, minus, "--atol", "0.1", "--rtol", "0")
    assert res.exit_code == 1, res.output
    assert _verdicts(res.output) == {"plus.onnx": "PASSED", "far.onnx": "FAILED", "minus.onnx": "PASSED"}
    assert res.output.rstrip().endswith("FAILED")
    # the reference is the first given: with plus first, minus is 0.15 away and fails
    res = _compare(plus, a, minus, "--atol", "0.1", "--rtol", "0")
    assert res.exit_code == 1 and _verdicts(res.output) == {"model_fp32.onnx": "PASSED", "minus.onnx": "FAILED"}, res.output
    help_text = CliRunner().invoke(cvig, ["compare", "--help"]).output
    assert "compared with the first one given" in help_text and "--load-outputs" in help_text


def test_artifacts_without_a_common_batch_are_refused(artifacts):
    a, b2, dyn = artifacts["a"], artifacts["b2"], artifacts["dyn"]
    res = _compare(a, b2)
    assert res.exit_code == 1 and "Traceback" not in res.output and "Polygraphy" not in res.output, res.output
    assert res.output.strip() == (f"Error: {a} takes a static batch of 1 and {b2} takes a static batch of 2: no batch fits "
                                  "both; compare artifacts exported with the same --batch, or export one with a "
                                  "--dynamic-batch range that covers the other's")
    res = _compare(dyn, "--checkpoint", CKPT, "--batch", "8")
    assert res.exit_code == 1 and f"--batch 8: {dyn} takes batches 1 to 4 only" in res.output, res.output
    res = _compare(a, dyn, "--batch", "4")
    assert res.exit_code == 1 and f"--batch 4: {a} takes a static batch of 1 only" in res.output, res.output


def test_a_batch_both_accept_is_used(artifacts):
    """A static batch of 2 inside a dynamic 1:4:4 range: compared at batch 2 (same weights: equal logits)."""
    b2, dyn = artifacts["b2"], artifacts["dyn"]
    res = _compare(b2, dyn)
    assert res.exit_code == 0 and "(batch 2, photos" in res.output, res.output
    assert _verdicts(res.output) == {str(dyn): "PASSED"}  # same file name twice: the runners are named by path
    res = _compare(dyn, dyn, "--batch", "3", "--checkpoint", CKPT)
    assert res.exit_code == 0 and "reference: pytorch (batch 3, photos" in res.output, res.output


def test_model_names_are_checked_with_a_suggestion(artifacts):
    res = _compare(artifacts["a"], "--checkpoint", CKPT, "--model", "cvig_digit")
    assert res.exit_code == 2 and "unknown model 'cvig_digit': did you mean cvig_digits?" in res.output, res.output
