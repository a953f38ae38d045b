"""A fixed --capacity P below N: its overflow is measured and reported like auto's (per input set, per block),
warned about, and gated (capacity.overflow)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import clustervig
from clustervig.checkpoint import model_from_checkpoint
from clustervig.export.cli import main as export_main
from clustervig.preprocess import sample_photographs, transform_spec


def recount_overflow(ckpt, capacity: int, images: torch.Tensor):
    """Overflow tokens per block, counted from the k-means labels of the model at ``capacity``: a partition of
    s tokens keeps P of them (docs/design.md section 3, "Overflow rule"), so s - P overflow when s > P."""
    model = model_from_checkpoint(ckpt, knn="padded", capacity=capacity).eval()
    per_block = []

    def hook(mod, args, out):
        labels = out[0] if isinstance(out, tuple) else out  # [B, N] cluster of every token
        over = 0
        for row in labels:
            sizes = torch.bincount(row, minlength=mod.clusters)
            over += int((sizes - capacity).clamp(min=0).sum())
        per_block.append(over)

    hooks = [d.kmeans.register_forward_hook(hook) for d in model.degc_modules()]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    return per_block


def test_fixed_capacity_overflow_is_reported_per_set_and_block(tmp_path, nano_ckpt):
    out = tmp_path / "out"
    p = 40
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano_ckpt), "--knn", "padded", "--capacity", str(p),
                                           "--gate", "capacity.overflow=off", "--no-engine", "-o", str(out)])
    assert res.exit_code == 0, res.output
    cap = json.loads((out / "report.json").read_text())["capacity"]
    assert (cap["mode"], cap["capacity"], cap["tokens"]) == ("fixed", p, 196)
    # the images the export measured on: its 4 sample photographs and 4 normal-noise images (seed 0)
    cfg = clustervig.get_config("cvig_nano")
    sets = {"photos": sample_photographs(transform_spec(cfg)),
            "random": torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    assert sorted(cap["sets"]) == sorted(sets)
    for name, x in sets.items():
        want = recount_overflow(nano_ckpt, p, x)
        got = cap["sets"][name]
        assert len(want) == 3 and sum(want) > 0, want
        assert got["overflow_at_capacity_per_block"] == want, name
        assert got["overflow_at_capacity"] == sum(want)
        assert got["images"] == 4 and got["slots"] == 4 * 196 * 3
        assert got["overflow_fraction"] == pytest.approx(sum(want) / (4 * 196 * 3), abs=0, rel=1e-12)
    warning = next(x for x in res.output.splitlines() if x.startswith(f"WARNING: --capacity {p}: tokens overflow"))
    for name in sets:
        assert f"{name} {cap['sets'][name]['overflow_at_capacity']} of 2352 token-block slots" in warning
    assert f"capacity P = {p} of N = 196 (fixed" in res.output  # in the summary too


def test_a_capacity_that_overflows_too_much_fails_before_any_work(tmp_path, nano_ckpt):
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano_ckpt), "--knn", "padded", "--capacity", "10",
                                           "--no-engine", "-o", str(out)])
    assert res.exit_code == 1, res.output
    cfg = clustervig.get_config("cvig_nano")
    sets = {"photos": sample_photographs(transform_spec(cfg)),
            "random": torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))}
    want = {s: sum(recount_overflow(nano_ckpt, 10, x)) for s, x in sets.items()}
    failed = [x for x in res.output.splitlines() if x.startswith("GATE FAILED capacity.overflow")]
    assert failed == [f"GATE FAILED capacity.overflow: --capacity 10 on {s}: {n} of 2352 token-block slots overflow "
                      f"their partition, {100 * n / 2352:.2f}% > 5%" for s, n in want.items()], res.output
    assert all(n / 2352 > 0.05 for n in want.values())
    assert "Error: --capacity 10 overflows too many tokens" in res.output and "[2/" not in res.output
    assert not out.exists()
    # --no-gates publishes, with the failure recorded and warned about
    res = CliRunner().invoke(export_main, ["--checkpoint", str(nano_ckpt), "--knn", "padded", "--capacity", "10",
                                           "--no-gates", "--samples", "1", "--no-engine", "-o", str(out)])
    assert res.exit_code == 0, res.output
    gates = json.loads((out / "report.json").read_text())["gates"]
    assert [r for r in gates["failed"] if r.startswith("capacity.overflow")] and "capacity overflow<=5%" in res.output
    assert "WARNING: gate failed (--no-gates: published anyway): capacity.overflow" in res.output


@pytest.mark.parametrize("capacity,cheaper", [(97, True), (98, False), (150, False)])
def test_a_capacity_above_n_over_sqrt_kappa_is_named_as_costlier_than_masked(nano_ckpt, capsys, capacity, cheaper):
    # cvig_nano: N = 196, kappa = 4: kappa P^2 < N^2 exactly when P < N / sqrt(kappa) = 98 (P = 98: both 38416)
    from clustervig.checkpoint import model_from_checkpoint
    from clustervig.export.cli import resolve_capacity

    model = model_from_checkpoint(nano_ckpt, knn="padded").eval()
    x = sample_photographs(transform_spec(model.cfg))[:1]
    entry = resolve_capacity(model, capacity, {"photos": x}, None)
    work = entry["similarities_per_block"]
    assert work == {"padded": 4 * capacity ** 2, "masked": 196 ** 2}
    assert entry["padded_cheaper_than_masked"] is (4 * capacity ** 2 < 196 ** 2) is cheaper
    warned = [line for line in capsys.readouterr().err.splitlines() if "kappa*P^2" in line]
    if cheaper:
        assert not warned
    else:
        assert len(warned) == 1 and f"{4 * capacity ** 2:,} similarities" in warned[0] and "--knn masked" in warned[0]
