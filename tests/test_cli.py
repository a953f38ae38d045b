"""The one `cvig` command: every job a subcommand, the same option spellings everywhere, help that teaches."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from clustervig.cli import COMMANDS, cvig

ENTRY_POINTS = {"export": "cvig-export", "compare": "cvig-compare", "run": "cvig-run", "bench": "cvig-bench",
                "accuracy": "cvig-accuracy", "profile": "cvig-profile", "train-digits": "cvig-train-digits",
                "convert": "cvig-convert", "train-photos": "cvig-train-photos", "dataset": "cvig-dataset",
                "doctor": "cvig-doctor", "build-plugins": "cvig-build-plugins"}


def subcommand(name: str) -> click.Command:
    return cvig.get_command(click.Context(cvig), name)


def test_group_lists_every_job():
    res = CliRunner().invoke(cvig, ["--help"])
    assert res.exit_code == 0
    for name in ENTRY_POINTS:
        assert re.search(rf"^  {name}\s", res.output, re.M), name
    assert set(COMMANDS) == set(ENTRY_POINTS)


def test_entry_points_are_the_same_commands():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cvig"] == "clustervig.cli:main"
    for name, script in ENTRY_POINTS.items():
        module, attr = scripts[script].split(":")
        assert (module, attr) == COMMANDS[name][:2], script
        assert isinstance(subcommand(name), click.Command)


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_consistent_options_and_help(name):
    cmd = subcommand(name)
    res = CliRunner().invoke(cvig, [name, "--help"])
    assert res.exit_code == 0, res.output
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name == "help":
            continue
        assert p.help, f"cvig {name} {p.opts[0]} has no help text"
        if "--json" in p.opts:
            assert p.is_flag, f"cvig {name} --json must be a flag that prints JSON to stdout"
        if p.name in ("output", "out"):
            assert "-o" in p.opts and "--output" in p.opts, f"cvig {name}: a written file is -o/--output"
        assert not any("plugin" in o and o != "--plugins-lib" and o not in ("--plugins", "--no-plugins") for o in p.opts), p.opts
        if p.name == "model_name":
            assert p.opts == ["--model"], f"cvig {name}: the variant is --model NAME"
    # examples keep their line breaks: each example is its own line of the rendered help
    if "Examples:" in res.output:
        block = res.output.split("Examples:", 1)[1].strip("\n").splitlines()
        assert len(block) >= 2 and all(line.startswith("    cvig") for line in block[:2]), block[:3]


def test_subcommands_run_through_the_group(capsys):
    res = CliRunner().invoke(cvig, ["profile", "--model", "cvig_nano", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["name"] == "cvig_nano"
    res = CliRunner().invoke(cvig, ["bench", "missing.onnx"])
    assert res.exit_code == 1 and "model missing.onnx does not exist" in res.output
    res = CliRunner().invoke(cvig, ["train-digits", "-o", "/proc/cvig_digits.pth"])
    assert res.exit_code == 2 and "cannot be written" in res.output and "epoch" not in res.output


def test_installed_cvig_command():
    exe = shutil.which("cvig") or str(Path(sys.executable).parent / "cvig")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("cvig, version "), r.stdout + r.stderr


def test_train_digits_never_overwrites_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "d.pth"
    existing.write_bytes(b"keep")
    res = CliRunner().invoke(cvig, ["train-digits", "-o", str(existing), "--epochs", "1"])
    assert res.exit_code == 2 and "--force" in res.output and existing.read_bytes() == b"keep"
    default = subcommand("train-digits").params
    assert next(p for p in default if p.name == "output").default is None  # a new timestamped file, not the shipped weights
