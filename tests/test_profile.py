"""Parameter and MAC counts against Table III of the paper."""
from __future__ import annotations

import json

import pytest
import torch

import clustervig
from clustervig.profile import main as profile_main, profile, profile_model, table3

PAPER = {  # Table III: params (M), GMACs
    "cvig_ti": (11.5, 1.3),
    "cvig_s": (28.2, 4.2),
    "cvig_b": (104.8, 16.2),
    "cvig_b_hr": (105.2, 62.3),
}


@pytest.fixture(scope="module")
def rows():
    return {r["name"]: r for r in table3()}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_within_half_percent(name, rows):
    params_m, _ = PAPER[name]
    assert abs(rows[name]["params_m"] - params_m) / params_m <= 0.005
    # the meta-device count equals a real model's parameter count
    if name == "cvig_ti":
        assert rows[name]["params"] == sum(p.numel() for p in clustervig.create_model(name).parameters())


@pytest.mark.parametrize("name", ["cvig_s", "cvig_b", "cvig_b_hr"])
def test_paper_comparable_gmacs_within_3_percent(name, rows):
    _, gmacs = PAPER[name]
    assert abs(rows[name]["gmacs_paper"] - gmacs) / gmacs <= 0.03


def test_ti_gmacs_matches_printed_precision(rows):
    # 1.260 GMACs: the paper prints one decimal (1.3); relative to the printed
    # 1.3 that is -3.1%, just outside 3% (README, MACs and parameters).
    g = rows["cvig_ti"]["gmacs_paper"]
    assert round(g, 1) == 1.3
    assert abs(g - 1.3) / 1.3 <= 0.035


def test_true_gmacs_add_mlp_and_graph_ops(rows):
    for name, r in rows.items():
        comp = r["gmacs_by_component"]
        assert r["gmacs_true"] == pytest.approx(r["gmacs_paper"] + comp["ggcn_mlp"] + comp["kmeans"] + comp["knn"] + comp["gat_attention"])
    # G-GCN MLP of Ti: 12 blocks x N x 3C x 2C (groups 1)
    assert rows["cvig_ti"]["gmacs_by_component"]["ggcn_mlp"] * 1e9 == pytest.approx(12 * 196 * 576 * 384)
    # k-means: 12 x ((T+1) + T) x N x kappa x C
    assert rows["cvig_ti"]["gmacs_by_component"]["kmeans"] * 1e9 == pytest.approx(12 * 41 * 196 * 4 * 192)


def test_analytic_stem_macs():
    p = profile("cvig_ti")
    # 3x3 convs: 3->64 @112^2, 64->64 @56^2, 64->96 @28^2, 96->192 @14^2, 192->192 @14^2
    expect = 27 * 64 * 112**2 + 576 * 64 * 56**2 + 576 * 96 * 28**2 + 864 * 192 * 14**2 + 1728 * 192 * 14**2
    assert p.macs["stem"] == pytest.approx(expect)


def test_real_partition_sizes_used_on_cpu(nano_model):
    real = profile_model(nano_model, batch=2, device="cpu")
    balanced = profile("cvig_nano")
    # uneven partitions cost more than balanced ones (sum of squares >= balanced)
    assert real.macs["knn"] >= balanced.macs["knn"] * (1 - 1e-9)
    assert real.macs["stem"] == pytest.approx(balanced.macs["stem"])


def test_cli_table3_and_json(capsys):
    assert profile_main(["--table3"]) == 0
    out = capsys.readouterr().out
    assert "cvig_b_hr" in out and "105.18" in out
    assert profile_main(["cvig_nano", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "cvig_nano" and d["gmacs_true"] > d["gmacs_paper"] > 0
    with pytest.raises(SystemExit):
        profile_main([])


@pytest.mark.parametrize("name", clustervig.list_models())
def test_cli_profiles_every_variant_as_registered(name):
    """`cvig profile --model NAME` describes the registered variant: its own class count (cvig_digits 10,
    cvig_photos 16), so the parameter count is the real model's and the head's MACs are its layers'."""
    from click.testing import CliRunner

    from clustervig.cli import cvig

    res = CliRunner().invoke(cvig, ["profile", "--model", name, "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    model = clustervig.create_model(name)
    assert d["name"] == name
    assert d["params"] == sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    heads = 1 + (model.dist_head is not None)  # class head (+ distillation head) on the pooled feature
    assert d["gmacs_by_component"]["head"] * 1e9 == pytest.approx(cfg.dim * cfg.head_dim + heads * cfg.head_dim * cfg.num_classes)


def test_cli_num_classes_gcn_and_checkpoint(tmp_path):
    from click.testing import CliRunner

    from clustervig.cli import cvig
    from clustervig.train import WEIGHTS_DIR

    def params(*args):
        res = CliRunner().invoke(cvig, ["profile", *args, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)["params"]

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params("--model", "cvig_digits", "--num-classes", "1000") == count(clustervig.create_model("cvig_digits", num_classes=1000))
    assert params("cvig_nano", "--gcn", "gin") == count(clustervig.create_model("cvig_nano", gcn="gin"))
    for ck in ("cvig_digits.pth", "cvig_photos.pth"):  # the checkpoint's model, as cvig export loads it
        assert params("--checkpoint", str(WEIGHTS_DIR / ck)) == count(clustervig.model_from_checkpoint(WEIGHTS_DIR / ck))
    # a plain state_dict without the distillation head: --model names it, the head it lacks is not counted
    nano = clustervig.create_model("cvig_nano", num_classes=10)
    sd = {k: v for k, v in nano.state_dict().items() if not k.startswith("dist_head.")}
    torch.save(sd, tmp_path / "plain.pth")
    nano.remove_distillation_head()
    assert params("--model", "cvig_nano", "--num-classes", "10", "--checkpoint", str(tmp_path / "plain.pth")) == count(nano)


def test_cli_names_the_nearest_variant_and_refuses_contradictions(tmp_path):
    from click.testing import CliRunner

    from clustervig.cli import cvig

    res = CliRunner().invoke(cvig, ["profile", "--model", "cvig_tii"])
    assert res.exit_code == 2 and "unknown model 'cvig_tii': did you mean cvig_ti?" in res.output
    res = CliRunner().invoke(cvig, ["profile", "--table3", "--model", "cvig_ti"])
    assert res.exit_code == 2 and "--table3" in res.output and "params M" not in res.output
    res = CliRunner().invoke(cvig, ["profile", "--checkpoint", str(tmp_path / "none.pth")])
    assert res.exit_code == 1 and "does not exist" in res.output
