"""`python -m bench --quick` (the smoke run) never writes over the published BENCHMARKS.md and bench/results/."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import bench.common as common
from bench import __main__ as suite

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "bench" / "results"


def _published() -> dict:
    """sha256 of BENCHMARKS.md and of every file under bench/results/ except the git-ignored tmp* folders."""
    files = [ROOT / "BENCHMARKS.md"] + [p for p in PUBLISHED.rglob("*")
                                        if p.is_file() and not p.relative_to(PUBLISHED).parts[0].startswith("tmp")]
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_quick_run_writes_to_tmp_quick_and_leaves_the_published_results_alone(monkeypatch, capsys):
    # the quick suite's graph step at its smallest (the code path of a real --quick run, one size)
    monkeypatch.setattr(suite, "QUICK", {**suite.QUICK, "graph": dict(tokens=[196], clusters=[1, 4], repeats=1)})
    before = _published()
    assert len(before) > 10  # BENCHMARKS.md and the committed JSON/PNG results
    try:
        assert suite.main(["--quick", "--only", "graph"]) == 0
    finally:
        common.configure(None, None)
    assert _published() == before
    out = capsys.readouterr().out
    quick = PUBLISHED / "tmp-quick"
    assert common.QUICK_RESULTS == quick
    assert f"quick run (smoke numbers): results in {quick}, tables in {quick / 'BENCHMARKS.md'}" in out
    assert (quick / "graph_construction_cpu.json").is_file() and "<!-- bench:graph -->" in (quick / "BENCHMARKS.md").read_text()
    # git ignores it (in a checkout: git itself; in an unpacked source tree: the .gitignore pattern that does it)
    if (ROOT / ".git").exists():
        r = subprocess.run(["git", "check-ignore", "-q", str(quick / "graph_construction_cpu.json")], cwd=ROOT)
        assert r.returncode == 0
    else:
        import fnmatch

        patterns = [line.strip().lstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
        assert any(fnmatch.fnmatch("bench/results/tmp-quick", p) for p in patterns if p and not p.startswith("#"))


@pytest.mark.parametrize("args,message", [
    (["--results", str(PUBLISHED)], "a quick run does not write its smoke numbers over the published results"),
    (["--markdown", str(ROOT / "BENCHMARKS.md")], "a quick run does not rewrite the published BENCHMARKS.md"),
])
def test_quick_run_refuses_the_published_paths(args, message):
    before = _published()
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "graph", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "== bench" not in r.stdout, r.stdout + r.stderr
    assert _published() == before


def test_quick_paths_default_and_named_folder(tmp_path):
    assert common.quick_paths(None, None) == (common.QUICK_RESULTS, common.QUICK_RESULTS / "BENCHMARKS.md")
    assert common.quick_paths(tmp_path, None) == (tmp_path, tmp_path / "BENCHMARKS.md")
    assert common.quick_paths(tmp_path, tmp_path / "B.md") == (tmp_path, tmp_path / "B.md")
