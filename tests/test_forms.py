"""Static form == reference form (docs/design.md section 3): max |dlogits| <= 1e-4 in FP32."""
from __future__ import annotations

import pytest
import torch

from clustervig.model import DEGC
from clustervig.registry import get_config

from conftest import clustered_tokens, make_model, varied_images

TOL = 1e-4
GCNS = ["mr", "edge", "sage", "gin"]


def logits_all_forms(model, x):
    out = {}
    with torch.no_grad():
        for form, knn in [("static", "masked"), ("static", "padded"), ("reference", None)]:
            model.set_form(form, knn=knn, capacity=None)
            out[f"{form}-{knn}" if knn else form] = model(x)
    model.set_form("static", knn="auto")
    return out


@pytest.mark.parametrize("gcn", GCNS)
@pytest.mark.parametrize("name", ["cvig_ti", "cvig_s", "cvig_b", "cvig_b_hr"])
def test_static_equals_reference_every_variant(name, gcn):
    x = varied_images(2, 224, seed=11)
    # S, B and B-dagger at a few of their 16 blocks: every block has the variant's width, tokens, kappa and
    # groups, so more blocks repeat the same check (at full depth they cost minutes on 2 CPU cores); Ti runs whole
    depth = {"cvig_s": 4, "cvig_b": 4, "cvig_b_hr": 2}.get(name)
    model = make_model(name, gcn=gcn, calib_images=x, **({"depth": depth} if depth else {}))
    out = logits_all_forms(model, x)
    ref = out["reference"]
    assert torch.isfinite(ref).all()
    # logits of a calibrated random network are O(1): the tolerance is meaningful
    assert 0.1 < ref.abs().max() < 100
    for key in ("static-masked", "static-padded"):
        diff = (out[key] - ref).abs().max().item()
        assert diff <= TOL, f"{name}/{gcn} {key} vs reference: max |dlogits| = {diff:.3g}"


@pytest.mark.parametrize("name,size,gcn", [("cvig_ti", (128, 224), "mr"), ("cvig_s", (160, 96), "edge"),
                                           ("cvig_b_hr", (96, 160), "sage"), ("cvig_nano", (512, 576), "gin")])
def test_static_equals_reference_non_square(name, size, gcn):
    # non-square inputs (issue #26): a (H/s, W/s) token grid, tokens row by row, a resampled-size position
    # embedding; cvig_nano at 512 x 576 has N = 32 x 36 = 1152 tokens, where knn="auto" takes the padded layout
    x = varied_images(2, size, seed=13)
    model = make_model(name, gcn=gcn, calib_images=x, img_size=size, **({} if name == "cvig_nano" else {"depth": 2}))
    assert model.cfg.grid_hw == (size[0] // model.cfg.stride, size[1] // model.cfg.stride)
    out = logits_all_forms(model, x)
    ref = out["reference"]
    assert torch.isfinite(ref).all() and 0.1 < ref.abs().max() < 100
    for key in ("static-masked", "static-padded"):
        diff = (out[key] - ref).abs().max().item()
        assert diff <= TOL, f"{name} {size} {key} vs reference: max |dlogits| = {diff:.3g}"


def _degc_with_stats(gcn: str, k: int, c: int = 16, clusters: int = 4, numerics: str = "paper"):
    cfg = get_config("cvig_nano", gcn=gcn, dim=c, clusters=clusters, groups=1, numerics=numerics)
    torch.manual_seed(0)
    degc = DEGC(cfg, k)
    for m in degc.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return degc.eval().double()


def degc_outputs(degc: DEGC, tokens: torch.Tensor):
    """tokens [B, N, C] -> outputs of the three forms, each [B, 2C, N, 1]."""
    x = tokens.transpose(1, 2).unsqueeze(-1)
    outs = {}
    with torch.no_grad():
        for form, mode in [("static", "masked"), ("static", "padded"), ("reference", "masked")]:
            degc.form, degc.knn.mode, degc.knn.capacity = form, mode, None
            outs[f"{form}-{mode}"] = degc(x)
    degc.form, degc.knn.mode = "static", "masked"
    return outs


def assert_forms_equal(outs, tol=1e-10):
    ref = outs["reference-masked"]
    for key in ("static-masked", "static-padded"):
        diff = (outs[key] - ref).abs().max().item()
        assert diff <= tol, f"{key} vs reference: {diff:.3g}"


@pytest.mark.parametrize("gcn", GCNS)
def test_hard_case_all_tokens_identical(gcn):
    # one partition holds every token, the other three are empty
    degc = _degc_with_stats(gcn, k=9)
    tokens = torch.randn(1, 1, 16, dtype=torch.float64).expand(2, 64, 16).clone()
    labels = degc.kmeans(degc.norm(tokens))
    assert labels.eq(0).all()
    assert_forms_equal(degc_outputs(degc, tokens))


@pytest.mark.parametrize("gcn", GCNS)
def test_hard_case_clusters_smaller_than_k_and_uneven_batch(gcn):
    # image 0: groups of 100, 20, 5, 1 tokens; image 1: 40, 40, 30, 16 -> different
    # partition sizes per image, and partitions smaller than K = 18
    degc = _degc_with_stats(gcn, k=18)
    a, _ = clustered_tokens([100, 20, 5, 1], c=16, noise=0.05, seed=1, anchor=True)
    b, _ = clustered_tokens([40, 40, 30, 16], c=16, noise=0.05, seed=2, anchor=True)
    tokens = torch.stack([a, b])
    labels = degc.kmeans(degc.norm(tokens))
    sizes = [sorted(torch.bincount(l, minlength=4).tolist()) for l in labels]
    assert sizes[0] != sizes[1]
    assert sizes[0] == [1, 5, 20, 100]  # a single-token partition and one of 5 < K
    assert_forms_equal(degc_outputs(degc, tokens))


def test_full_model_batch_with_different_partition_sizes():
    torch.manual_seed(5)
    # a noise image, a flat grey image and a two-tone image: very different partitions
    x = torch.stack([
        torch.randn(3, 224, 224),
        torch.full((3, 224, 224), 0.3),
        torch.cat([torch.full((3, 112, 224), -1.0), torch.full((3, 112, 224), 1.0)], dim=1),
    ])
    model = make_model("cvig_ti", gcn="mr", calib_images=x)
    sizes = []
    hook = model.blocks[0].grapher.degc.kmeans.register_forward_hook(
        lambda m, i, o: sizes.extend(sorted(torch.bincount(l, minlength=4).tolist()) for l in o)
    )
    out = logits_all_forms(model, x)
    hook.remove()
    assert len({tuple(s) for s in sizes[:3]}) > 1  # partition sizes differ between images
    for key in ("static-masked", "static-padded"):
        assert (out[key] - out["reference"]).abs().max().item() <= TOL


def test_padded_capacity_overflow_is_counted_and_deterministic():
    x = varied_images(2, 224, seed=3)
    model = make_model("cvig_nano", knn="padded", capacity=40, calib_images=x)
    with torch.no_grad():
        a = model(x)
        b = model(x)
    assert torch.equal(a, b)
    overflow = [d.knn.last_overflow for d in model.degc_modules()]
    assert sum(overflow) > 0  # 196 tokens in 4 partitions of capacity 40 must overflow
    # with enough capacity, no overflow and the result equals the masked form
    model.set_form("static", knn="padded", capacity=196)
    with torch.no_grad():
        c = model(x)
    assert all(d.knn.last_overflow == 0 for d in model.degc_modules())
    model.set_form("static", knn="masked")
    with torch.no_grad():
        assert (model(x) - c).abs().max() <= TOL


def test_calibrated_random_model_is_not_degenerate(nano_model):
    # guard for the tests above: different images give different logits
    with torch.no_grad():
        out = nano_model(torch.randn(2, 3, 224, 224))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_gatv2_masked_equals_reference_over_nonempty_partitions():
    from clustervig.gcn import GATv2

    torch.manual_seed(0)
    gat = GATv2(16).double()
    z = torch.randn(3, 6, 16, dtype=torch.float64)
    nonempty = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    out = gat(z, nonempty)
    for b in range(3):
        keep = nonempty[b]
        ref = gat.forward_reference(z[b, keep])
        assert (out[b, keep] - ref).abs().max() < 1e-12
    # an explicit numpy GATv2 on image 1 (Eq. 2-3)
    import numpy as np

    wl, bl = gat.lin_l.weight.detach().numpy(), gat.lin_l.bias.detach().numpy()
    wr, br = gat.lin_r.weight.detach().numpy(), gat.lin_r.bias.detach().numpy()
    att, bias = gat.att.detach().numpy(), gat.bias.detach().numpy()
    zs = z[1, nonempty[1]].numpy()
    for i in range(len(zs)):
        e = np.array([att @ np.where(v > 0, v, 0.2 * v) for v in (wr @ zs[i] + br + zs @ wl.T + bl)])
        alpha = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        expect = (alpha[:, None] * (zs @ wl.T + bl)).sum(0) + bias
        np.testing.assert_allclose(out[1, nonempty[1]][i].detach().numpy(), expect, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 4])
def test_edgeconv_per_token_decomposition_equals_per_edge_mlp(groups):
    from clustervig.gcn import GEdgeConv
    from clustervig.graph import gather_neighbors

    torch.manual_seed(groups)
    e = GEdgeConv(16, 32, groups).double().eval()
    bn = e.nn[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    zt = torch.randn(2, 20, 16, dtype=torch.float64)
    idx = torch.randint(0, 20, (2, 20, 5))
    xv = x.unsqueeze(2).expand(-1, -1, 5, -1)
    edge = torch.cat([xv, gather_neighbors(x, idx) - xv, zt.unsqueeze(2).expand_as(xv)], dim=-1)
    direct = e.nn(edge.permute(0, 3, 1, 2)).amax(-1).transpose(1, 2)  # MLP on every edge
    with torch.no_grad():
        assert (e.forward_static(x, idx, None, zt) - direct).abs().max() < 1e-12


# numerics="authors" (docs/design.md): centred tokens, k-means on them, GATv2 on the k-means centroids
@pytest.mark.parametrize("gcn", GCNS)
def test_authors_numerics_forms_equal_uneven_partitions(gcn):
    degc = _degc_with_stats(gcn, k=18, numerics="authors")
    a, _ = clustered_tokens([100, 20, 5, 1], c=16, noise=0.05, seed=1, anchor=True)
    b, _ = clustered_tokens([40, 40, 30, 16], c=16, noise=0.05, seed=2, anchor=True)
    tokens = torch.stack([a, b])
    xc, xn = degc.norm(tokens)
    assert xc.mean(dim=1).abs().max() < 1e-12  # centred per image
    labels, centres = degc.kmeans(xc)
    assert centres.shape == (2, 4, 16)
    assert len(set(tuple(sorted(torch.bincount(l, minlength=4).tolist())) for l in labels)) == 2
    assert_forms_equal(degc_outputs(degc, tokens))


def test_authors_numerics_full_model_forms_equal():
    x = varied_images(2, 224, seed=11)
    model = make_model("cvig_nano", gcn="mr", calib_images=x, numerics="authors")
    out = logits_all_forms(model, x)
    assert 0.1 < out["reference"].abs().max() < 100
    for key in ("static-masked", "static-padded"):
        assert (out[key] - out["reference"]).abs().max().item() <= TOL
    paper = make_model("cvig_nano", gcn="mr", calib_images=x)
    with torch.no_grad():  # same weights (same seed), other numerics: other logits
        assert (paper(x) - out["static-masked"]).abs().max() > 1e-3
