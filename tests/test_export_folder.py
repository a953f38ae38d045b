"""cvig export's output folder: one export at a time, the user's files, a full disk, a missing parent."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from clustervig.export.cli import LOCK_FILE
from clustervig.export.cli import main as export_main
from clustervig.train import WEIGHTS_DIR
from clustervig.utils import atomic_path, folder_lock

DIGITS = WEIGHTS_DIR / "cvig_digits.pth"


def _snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` (hidden ones too) with the SHA-256 of each file."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _error_lines(output: str) -> list:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _check_published(out: Path, model: str) -> dict:
    """``out`` holds one export's complete set: exactly the files its report.json lists, all of ``model``."""
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"])  # no lock, no staging folder
    assert report["model"]["name"] == model
    for name, art in report["artifacts"].items():
        f = out / art["path"]
        assert f.stat().st_size == art["bytes"], name
        meta = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        assert json.loads(meta["clustervig.config"])["name"] == model
        assert json.loads((out / f"model_{name}.json").read_text()) == meta
    img = json.loads((out / "preprocess.json").read_text())["img_size"]
    assert img == {"cvig_digits": 32, "cvig_nano": 224}[model]
    return report


def test_two_exports_racing_on_one_folder(tmp_path):
    """Two real processes into one folder at the same time: one owns it to the end, the other is refused at once
    naming the owner's PID; the folder holds one model's complete set and its report.json."""
    out = tmp_path / "conc"
    cmds = {"cvig_digits": ["--checkpoint", str(DIGITS), "--fp16"], "cvig_nano": ["--model", "cvig_nano"]}
    procs = {m: subprocess.Popen([sys.executable, "-m", "clustervig.export.cli", *args, "--samples", "2", "--no-engine",
                                  "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m, args in cmds.items()}
    outputs = {m: p.communicate(timeout=600)[0] for m, p in procs.items()}
    codes = {m: p.returncode for m, p in procs.items()}
    winners = [m for m, c in codes.items() if c == 0]
    assert len(winners) == 1, (codes, outputs)
    winner = winners[0]
    loser = next(m for m in cmds if m != winner)
    assert codes[loser] == 1, outputs[loser]
    assert _error_lines(outputs[loser]) == [
        f"Error: {out}/ is in use by another cvig export (PID {procs[winner].pid}), which owns it until it has finished: "
        "wait for it to finish, or choose another output folder"], outputs[loser]
    assert "[1/" not in outputs[loser] and "Traceback" not in outputs[loser]  # refused before any work
    _check_published(out, winner)


def test_a_held_folder_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_fp32.onnx").write_bytes(b"being written by someone")
    with folder_lock(out, LOCK_FILE):
        before = _snapshot(out)
        res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "--no-engine", "-o", str(out)])
        assert res.exit_code == 1, res.output
        assert f"is in use by another cvig export (PID {os.getpid()})" in res.output
        assert "[1/" not in res.output
        assert _snapshot(out) == before  # not even the lock file was touched
    assert sorted(p.name for p in out.iterdir()) == ["model_fp32.onnx"]  # the holder removed its lock file


def test_a_lock_file_left_by_a_killed_export_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # nobody holds a lock on it: its process is gone
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine", "-o", str(out)])
    assert res.exit_code == 0, res.output
    _check_published(out, "cvig_digits")  # and the stale lock file is gone


def test_a_failed_first_export_leaves_no_folder_and_no_lock(tmp_path):
    out = tmp_path / "new"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--num-classes", "3", "-o", str(out)])
    assert res.exit_code == 1 and "not --num-classes 3" in res.output, res.output
    assert not out.exists()


def test_the_users_own_files_are_never_replaced_without_force(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model_fp32.onnx").write_bytes(b"my own model")
    (out / "preprocess.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    args = ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine", "-o", str(out)]
    res = CliRunner().invoke(export_main, args)
    assert res.exit_code == 1, res.output
    assert _error_lines(res.output) == [
        f"Error: {out}/ holds model_fp32.onnx, preprocess.json, and no report.json of an earlier cvig export lists "
        "them: this export would replace them; choose another output folder, or add --force to replace them"]
    assert "[1/" not in res.output  # before any work
    assert _snapshot(out) == before
    # --force replaces exactly those (and writes its others); a file with another name is never touched
    res = CliRunner().invoke(export_main, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert f"--force: replaced model_fp32.onnx, preprocess.json in {out}/" in res.output
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(report["files"] + ["notes.txt"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "preprocess.json").read_text())["img_size"] == 32
    assert onnx.load(str(out / "model_fp32.onnx")).graph.node  # the export's model now


def test_an_earlier_export_is_replaced_but_not_a_file_its_report_does_not_list(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine", "-o", str(out)])
    assert res.exit_code == 0, res.output
    (out / "model_fp16.onnx").write_bytes(b"the user's FP16 model, not listed by the report")
    before = _snapshot(out)
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--fp16", "--no-validate", "--no-engine",
                                           "-o", str(out)])
    assert res.exit_code == 1 and "holds model_fp16.onnx, which the earlier export's report.json there does not list" \
        in res.output, res.output
    assert _snapshot(out) == before
    # without --fp16 the same folder is the earlier export's to replace: model_fp32.onnx and the others are its own
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model_fp16.onnx").read_bytes() == b"the user's FP16 model, not listed by the report"


def test_a_foreign_report_json_may_be_replaced_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"quarterly": 3}')
    args = ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine", "-o", str(out)]
    res = CliRunner().invoke(export_main, args)
    assert res.exit_code == 2 and "did not write" in res.output and "--force" in res.output
    res = CliRunner().invoke(export_main, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert "--force: replaced report.json" in res.output
    assert json.loads((out / "report.json").read_text())["model"]["name"] == "cvig_digits"


EARLIER = '{"artifacts": {"fp32": {"path": "model_fp32.onnx"}}, "files": ["model_fp32.onnx", "report.json"]}'


def _fail_fp32_write(monkeypatch):
    """The disk fills while the FP32 model is written: half of it reaches the file, then ENOSPC."""
    real = onnx.save

    def save(model, f, *a, **k):
        data = model.SerializeToString()
        with open(f, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(onnx, "save", save)
    return real


def _fail_report_write(monkeypatch):
    """The disk fills at the very end, writing report.json (every artifact is staged by then)."""
    import clustervig.export.cli as cli

    real = cli.write_json_atomic

    def write(path, obj, indent=2):
        if Path(path).name != "report.json":
            return real(path, obj, indent)
        with atomic_path(path) as tmp:
            tmp.write_text('{"partial": ')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(cli, "write_json_atomic", write)


@pytest.mark.parametrize("where", ["fp32", "report"])
def test_a_full_disk_is_one_line_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_fp32.onnx").write_bytes(b"earlier export")
    (out / "report.json").write_text(EARLIER)
    (out / "notes.txt").write_text("the user's")
    before = _snapshot(tmp_path)
    (_fail_fp32_write if where == "fp32" else _fail_report_write)(monkeypatch)
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--fp16", "--samples", "1", "--no-engine",
                                           "-o", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    errors = _error_lines(res.output)
    assert len(errors) == 1 and errors[0].startswith(f"Error: no space left on the device of {out}/ ("), res.output
    # how much is free there and about how much the export needs (digits: 0.42 M weights, FP32 + FP16 graphs)
    free, need = errors[0].split("(")[1].split(")")[0].split(" free, the export needs about ")
    assert free.endswith(" MiB") and need.endswith(" MiB") and 2.0 < float(need[:-4]) < 10.0, errors[0]
    assert f"nothing was published, {out}/ is as it was" in errors[0]
    assert _snapshot(tmp_path) == before  # no staging folder, temp file or lock file anywhere


def test_a_full_disk_on_a_new_folder_leaves_nothing(tmp_path, monkeypatch):
    _fail_fp32_write(monkeypatch)
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-validate", "--no-engine",
                                           "-o", str(tmp_path / "new")])
    assert res.exit_code == 1 and "no space left on the device" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_a_missing_parent_folder_is_refused_like_cvig_run(tmp_path):
    from clustervig.runtime.cli import run_main

    deep = tmp_path / "nonexistent" / "deep" / "out"
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-engine", "-o", str(deep)])
    assert res.exit_code == 2, res.output
    assert f"folder {deep.parent} does not exist; create it first or choose another path" in res.output
    assert "[1/" not in res.output and not (tmp_path / "nonexistent").exists()
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--no-engine", "-o", str(tmp_path / "o"),
                                           "--triton-repo", str(deep)])  # the same rule for the Triton repository
    assert res.exit_code == 2 and f"folder {deep.parent} does not exist; create it first" in res.output, res.output
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "o").exists()
    # cvig run -o: the same rule, the same words
    res = CliRunner().invoke(run_main, [str(tmp_path / "x.onnx"), str(tmp_path / "a.png"), "-o", str(deep / "rows.json")])
    assert res.exit_code == 2 and f"folder {deep} does not exist; create it first or choose another path" in res.output
    # the output folder itself may be new
    res = CliRunner().invoke(export_main, ["--checkpoint", str(DIGITS), "--no-validate", "--no-engine",
                                           "-o", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output


def test_a_full_disk_after_publication_says_so(tmp_path):
    from clustervig.export.cli import disk_full_message

    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".report.json.x.tmp"))
    before = disk_full_message(exc, tmp_path, 5 * 2**20)
    after = disk_full_message(exc, tmp_path, 5 * 2**20, published=True)
    assert before.startswith(f"no space left on the device of {tmp_path}/ (") and "about 5.0 MiB" in before
    assert f"nothing was published, {tmp_path}/ is as it was" in before
    assert f"the export is published in {tmp_path}/ but {exc.filename} could not be written" in after
    assert "nothing was published" not in after and "\n" not in before + after
