"""ClusterViG as a backbone (issue #26): non-square inputs, position embeddings resampled from the trained grid,
feature maps after chosen blocks (timm's features_only convention) and the simple feature pyramid.

References are independent of the code under test: the classifier's own blocks read by forward hooks, PIL's
bicubic resize for the position embedding, numpy for pooling and the transposed convolution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clustervig
from clustervig.checkpoint import load_state_dict, model_from_checkpoint, save_checkpoint
from clustervig.model import resample_pos_embed

from conftest import make_model, varied_images

SMALL = dict(depth=3, dim=32)  # cvig_nano's width; three blocks
SIZE = (96, 160)  # a 6 x 10 token grid at stride 16: N = 60


def pil_bicubic(pe: torch.Tensor, hw) -> np.ndarray:
    """PIL's BICUBIC resize of every channel of a [1, C, h, w] embedding (float images, mode F)."""
    return np.stack([np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F").resize((hw[1], hw[0]),
                                                                                               Image.BICUBIC))
                     for c in pe[0].detach()])


# -- sizes --------------------------------------------------------------------------------------------------


def test_non_square_config_grid_and_tokens():
    cfg = clustervig.get_config("cvig_s", img_size=(800, 1344))
    assert cfg.img_hw == (800, 1344) and cfg.grid_hw == (50, 84) and cfg.stride == 16
    assert cfg.tokens == 4200 and cfg.knn_mode == "padded"  # auto: padded above N = 1024
    # a square (H, W) is stored as the one int every variant records; JSON lists come back as tuples
    assert clustervig.get_config("cvig_ti", img_size=(224, 224)) == clustervig.get_config("cvig_ti")
    assert clustervig.get_config("cvig_s", img_size=[512, 512]).grid == 32
    rebuilt = clustervig.ClusterViGConfig(**{**cfg.to_dict(), "mean": tuple(cfg.mean), "std": tuple(cfg.std)})
    assert rebuilt == cfg and rebuilt.img_size == (800, 1344)
    # digits: stride 4
    assert clustervig.get_config("cvig_digits", img_size=(32, 48)).grid_hw == (8, 12)


@pytest.mark.parametrize("size,words", [
    ((801, 1344), ["801x1344", "stride 16", "800x1344"]),
    ((800, 1350), ["800x1350", "stride 16", "nearest being 800x1344"]),
    (100, ["100x100", "divisible by 16", "96x96"]),
    ((8, 1000), ["8x1000", "16x1008"]),
])
def test_size_not_divisible_by_the_stride_is_refused_naming_the_fix(size, words):
    with pytest.raises(ValueError) as exc:
        clustervig.create_model("cvig_s", img_size=size)
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_size_too_small_for_the_partitions_is_refused_before_building(monkeypatch):
    built = []
    monkeypatch.setattr(clustervig.model.ClusterViG, "reset_parameters", lambda self: built.append(1))
    with pytest.raises(ValueError, match=r"16x32 gives a 1x2 token grid .* 2 tokens, fewer than the 4 clusters"):
        clustervig.create_model("cvig_s", img_size=(16, 32))
    assert not built  # refused by the config, before a module was made
    assert clustervig.create_model("cvig_nano", img_size=(32, 32)).cfg.tokens == 4  # 4 tokens, 4 clusters: fine


def test_inconsistent_grid_is_refused():
    with pytest.raises(ValueError, match="no single stride"):
        clustervig.create_model("cvig_nano", img_size=(64, 96), grid=(4, 4))


def test_wrong_input_size_names_the_expected_one():
    model = clustervig.create_model("cvig_nano", img_size=SIZE).eval()
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 96, 160\], got \[1, 3, 160, 96\]"):
        model(torch.zeros(1, 3, 160, 96))


# -- position embedding ---------------------------------------------------------------------------------------


def test_resample_at_the_trained_grid_is_exact():
    torch.manual_seed(0)
    pe = torch.randn(1, 8, 14, 14)
    assert torch.equal(resample_pos_embed(pe, 14), pe)
    # not only by the early return: bicubic at scale 1 samples the grid points themselves
    same = F.interpolate(pe, size=(14, 14), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(same, pe)


@pytest.mark.parametrize("hw", [(50, 84), (32, 32), (6, 10), (10, 7)])
def test_resample_equals_pil_bicubic(hw):
    torch.manual_seed(1)
    pe = torch.randn(1, 6, 14, 14)
    out = resample_pos_embed(pe, hw)
    assert out.shape == (1, 6, *hw)
    np.testing.assert_allclose(out[0].numpy(), pil_bicubic(pe, hw), atol=2e-5)
    assert (out - pe.mean()).abs().max() > 0.1  # not a constant map


def test_checkpoint_trained_at_224_loads_at_another_size(tmp_path):
    src = make_model("cvig_nano")
    path = save_checkpoint(src, tmp_path / "nano224.pth")
    # at the trained size: the embedding and the logits are the trained model's, bit for bit
    same = model_from_checkpoint(path)
    assert torch.equal(same.pos_embed, src.pos_embed) and "pos_embed_resampled" not in same.load_notes
    x = varied_images(2, 224, seed=3)
    with torch.no_grad():
        assert torch.equal(same.eval()(x), src(x))
    # at 96 x 160: the grid follows the recorded stride, the embedding is PIL's bicubic of the trained one
    other = model_from_checkpoint(path, img_size=SIZE)
    assert other.cfg.grid_hw == (6, 10) and other.pos_embed.shape == (1, 32, 6, 10)
    np.testing.assert_allclose(other.pos_embed[0].detach().numpy(), pil_bicubic(src.pos_embed, (6, 10)), atol=2e-5)
    assert other.load_notes["pos_embed_resampled"]["from_grid"] == [14, 14]
    assert other.load_notes["pos_embed_resampled"]["to_grid"] == [6, 10]
    # every other weight is the checkpoint's
    sd, osd = src.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], osd[k]) for k in sd if k != "pos_embed")
    # create_model(pretrained=...) does the same for a named variant
    named = clustervig.create_model("cvig_nano", pretrained=path, img_size=SIZE)
    assert torch.equal(named.pos_embed, other.pos_embed)


def test_recorded_stride_is_kept_and_bad_size_named(tmp_path):
    digits = clustervig.create_model("cvig_digits")
    path = save_checkpoint(digits, tmp_path / "digits.pth")
    m = model_from_checkpoint(path, img_size=(32, 48))
    assert m.cfg.grid_hw == (8, 12) and m.cfg.stride == 4
    with pytest.raises(clustervig.CheckpointError, match="not a multiple of the model of checkpoint .* stride 4"):
        model_from_checkpoint(path, img_size=(34, 48))


def test_non_square_checkpoint_round_trip(tmp_path):
    src = make_model("cvig_nano", img_size=SIZE, **SMALL)
    path = save_checkpoint(src, tmp_path / "wide.pth")
    back = model_from_checkpoint(path).eval()
    assert back.cfg.img_hw == SIZE and back.cfg == src.cfg
    x = varied_images(2, SIZE, seed=4)
    with torch.no_grad():
        assert torch.equal(back(x), src(x))


def test_module_order_keeps_the_weights_a_seed_gives():
    # reset_parameters initialises in module order: stem, blocks, then the head (or the pyramid), as before
    # backbones existed, so a seed draws the classifier weights it always drew
    keys = list(clustervig.create_model("cvig_nano").state_dict())
    tops = list(dict.fromkeys(k.split(".")[0] for k in keys))
    assert tops == ["pos_embed", "stem", "blocks", "prediction", "head", "dist_head"]
    bb = list(clustervig.create_model("cvig_nano", features_only=True, feature_pyramid=True).state_dict())
    assert list(dict.fromkeys(k.split(".")[0] for k in bb)) == ["pos_embed", "stem", "blocks", "pyramid"]


# -- feature outputs ------------------------------------------------------------------------------------------


def classifier_block_outputs(model, x, blocks):
    """The classifier's own maps after ``blocks``, read by forward hooks (independent of forward_intermediates)."""
    got = {}
    hooks = [model.blocks[i].register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o)) for i in blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [got[i] for i in blocks]


def test_features_only_returns_the_classifiers_block_maps():
    x = varied_images(2, SIZE, seed=5)
    clf = make_model("cvig_nano", img_size=SIZE, calib_images=x)
    bb = clustervig.create_model("cvig_nano", img_size=SIZE, features_only=True, out_indices=(0, -2)).eval()
    assert len(bb.blocks) == 2 and bb.head is None and bb.prediction is None  # block 2 and the head: not built
    load_state_dict(bb, clf.state_dict())  # the classifier's weights, head and block 2 left out
    with torch.no_grad():
        feats = bb(x)
    expect = classifier_block_outputs(clf, x, [0, 1])
    assert [tuple(f.shape) for f in feats] == [(2, 32, 6, 10)] * 2
    for f, e in zip(feats, expect):
        assert torch.equal(f, e)
    assert [f["name"] for f in bb.feature_info] == ["block0", "block1"]
    assert [f["reduction"] for f in bb.feature_info] == [16, 16]
    assert bb.cfg.feature_outputs()[1] == {"name": "block1", "channels": 32, "stride": 16, "shape": [32, 6, 10]}
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # two different blocks


@pytest.mark.parametrize("bad,match", [
    (dict(out_indices=(3,)), r"blocks 0..2 .* \[3\] out of range"),
    (dict(out_indices=(2, 1)), "increasing order"),
    (dict(out_indices=(1, -2)), "distinct blocks"),
    (dict(out_indices=(0, 1), feature_pyramid=True), "one block"),
])
def test_bad_out_indices_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        clustervig.create_model("cvig_nano", features_only=True, **bad)


def test_feature_pyramid_levels_against_numpy():
    x = varied_images(2, SIZE, seed=6)
    torch.manual_seed(0)
    bb = clustervig.create_model("cvig_nano", img_size=SIZE, features_only=True, feature_pyramid=True)
    from clustervig.utils import calibrate_batchnorm

    calibrate_batchnorm(bb, [x])
    got = {}
    hook = bb.blocks[-1].register_forward_hook(lambda m, a, o: got.__setitem__("map", o))
    with torch.no_grad():
        p3, p4, p5, p6 = bb(x)
    hook.remove()
    m = got["map"].numpy().astype(np.float64)  # [2, 32, 6, 10]
    assert [f["name"] for f in bb.feature_info] == ["p3", "p4", "p5", "p6"]
    assert [f["reduction"] for f in bb.feature_info] == [8, 16, 32, 64]
    assert [list(t.shape[1:]) for t in (p3, p4, p5, p6)] == [o["shape"] for o in bb.cfg.feature_outputs()]
    np.testing.assert_array_equal(p4.numpy(), m.astype(np.float32))
    pool = m.reshape(2, 32, 3, 2, 5, 2).max(axis=(3, 5))  # 2x2 max pooling, stride 2
    np.testing.assert_array_equal(p5.numpy(), pool.astype(np.float32))
    np.testing.assert_array_equal(p6.numpy(), pool[:, :, ::2, ::2].astype(np.float32))  # kernel 1, stride 2
    # transposed 2x2 convolution, stride 2: each input cell writes a 2x2 block W[c_in, c_out, dy, dx]
    w = bb.pyramid.up.weight.detach().numpy().astype(np.float64)
    b = bb.pyramid.up.bias.detach().numpy().astype(np.float64)
    up = np.einsum("nchw,cdyx->ndhywx", m, w).reshape(2, 16, 12, 20) + b[None, :, None, None]
    np.testing.assert_allclose(p3.numpy(), up, rtol=1e-5, atol=1e-5)


def test_pyramid_is_untrained_in_a_classifier_checkpoint(tmp_path):
    clf = make_model("cvig_nano")
    path = save_checkpoint(clf, tmp_path / "clf.pth")
    bb = model_from_checkpoint(path, img_size=SIZE, features_only=True, feature_pyramid=True)
    assert bb.load_notes["untrained"] == ["pyramid.up.weight", "pyramid.up.bias"]
    assert bb.load_notes["pos_embed_resampled"]["to_grid"] == [6, 10]
    # a backbone saved with its pyramid loads it back, nothing untrained
    path2 = save_checkpoint(bb, tmp_path / "bb.pth")
    again = model_from_checkpoint(path2)
    assert "untrained" not in again.load_notes and torch.equal(again.pyramid.up.weight, bb.pyramid.up.weight)


def test_backbone_static_forms_equal_reference_non_square():
    x = varied_images(2, SIZE, seed=7)
    bb = make_model("cvig_nano", img_size=SIZE, calib_images=x, features_only=True, out_indices=(0, 1, 2))
    outs = {}
    with torch.no_grad():
        for form, knn, cap in [("reference", None, None), ("static", "masked", None), ("static", "padded", None),
                               ("static", "padded", 60)]:
            bb.set_form(form, knn=knn, capacity=cap)
            outs[f"{form}-{knn}"] = bb(x)
    ref = outs.pop("reference-None")
    assert all(torch.isfinite(r).all() for r in ref)
    for key, feats in outs.items():
        for i, (a, r) in enumerate(zip(feats, ref)):
            diff = (a - r).abs().max().item()
            assert diff <= 1e-4 * max(1.0, r.abs().max().item()), f"{key} block {i}: {diff:.3g}"
