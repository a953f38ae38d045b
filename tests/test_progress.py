"""Progress display of long work (clustervig.cliutil.Progress): on stderr, quiet with --json, in cvig accuracy
and the training commands (cvig run: tests/test_runtime.py)."""
from __future__ import annotations

import io
import json
import math

import pytest
from click.testing import CliRunner

import clustervig.cliutil as cliutil
from clustervig.cli import cvig
from clustervig.cliutil import Progress
from clustervig.train import WEIGHTS_DIR


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar(stream, total=8, **kw):
    bar = Progress("job", total, stream=stream, **kw)
    clock = FakeClock()
    bar._clock = clock
    bar._start = bar._last = clock.t
    return bar, clock


def test_off_a_terminal_a_line_per_quarter_once_the_work_is_slow():
    out = io.StringIO()
    bar, clock = _bar(out)
    for _ in range(8):
        clock.t += 0.5  # 4 s in all: the first quarter ends after 1 s
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [
        "job: 2/8 images (25%) [1 s, about 3 s left]",
        "job: 4/8 images (50%) [2 s, about 2 s left]",
        "job: 6/8 images (75%) [3 s, about 1 s left]",
        "job: 8/8 images (100%) [4 s]",
    ]
    # quick work prints nothing, and so does a disabled bar (--json)
    for enabled, step in ((True, 0.01), (False, 10.0)):
        out = io.StringIO()
        bar, clock = _bar(out, enabled=enabled)
        for _ in range(8):
            clock.t += step
            bar.update(1)
        bar.close()
        assert out.getvalue() == ""


def test_min_interval_spaces_the_lines_out():
    out = io.StringIO()
    bar, clock = _bar(out, total=4, min_interval_s=15)
    for dt in (10, 10, 10, 10):  # quarters at 10, 20, 30, 40 s: lines at 20 and 40 only (15 s apart at least)
        clock.t += dt
        bar.update(1, note="loss 0.5")
    assert out.getvalue().splitlines() == ["job: 2/4 images (50%) [20 s, about 20 s left]  loss 0.5",
                                           "job: 4/4 images (100%) [40 s]  loss 0.5"]


def test_on_a_terminal_one_line_redrawn():
    out = Tty()
    bar, clock = _bar(out, total=3)
    for _ in range(3):
        clock.t += 0.2
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.endswith("job: 3/3 images (100%) [1 s]\n"), repr(text)
    out = Tty()
    bar, clock = _bar(out, total=1, transient=True)
    bar.update(1)
    bar.close()
    assert out.getvalue().endswith("\r\x1b[K"), repr(out.getvalue())  # erased: the caller prints its own summary


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("acc")
    res = CliRunner().invoke(cvig, ["export", "--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--no-validate",
                                    "--dynamic-batch", "1:32:64", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out / "model_fp32.onnx"


def test_accuracy_shows_progress_unless_json(digits_onnx, monkeypatch):
    monkeypatch.setattr(Progress, "quiet_s", 0.0)
    res = CliRunner().invoke(cvig, ["accuracy", str(digits_onnx), str(digits_onnx), "--digits"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("cvig accuracy (360 images x 2 models): ")]
    assert len(lines) == 4 and "720/720 image runs (100%)" in lines[-1], res.stderr
    # the same file twice: two rows (they used to overwrite each other under one file name)
    rows = [line.split("  ")[0].strip() for line in res.stdout.splitlines()[1:]]
    assert rows == [f"{digits_onnx} #1", f"{digits_onnx} #2"], res.stdout
    res = CliRunner().invoke(cvig, ["accuracy", str(digits_onnx), "--digits", "--json"])
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    (row,) = json.loads(res.stdout)
    assert row["images"] == 360 and row["top1"] == pytest.approx(359 / 360)  # README: 99.72 % on the held-out scans


def test_training_shows_each_epochs_steps(tmp_path, monkeypatch):
    """cvig train-digits: a Progress per epoch over its steps, on stderr; the library's fit() stays silent."""
    made = []

    class Recorder(Progress):
        def __init__(self, label, total, **kw):
            super().__init__(label, total, **kw)
            self.was_enabled = self.enabled
            made.append(self)

    monkeypatch.setattr(cliutil, "Progress", Recorder)
    res = CliRunner().invoke(cvig, ["train-digits", "--epochs", "1", "-o", str(tmp_path / "d.pth")])
    assert res.exit_code == 0, res.output
    steps = math.ceil(1437 / 64)
    assert [(b.label, b.total, b.unit, b.done, b.was_enabled) for b in made] == [("epoch 1/1", steps, "steps", steps, True)]
    assert made[0].note.startswith("loss ") and made[0].transient
    assert "epoch   1/1  loss" in res.stdout
