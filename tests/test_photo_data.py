"""The photo-patches data set (224-px real image content from scikit-image) and the cvig_photos training recipe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import clustervig
from clustervig import photo_data
from clustervig.photo_data import SOURCES, distinct_sources, photo_patches_part, photo_patches_split, regions, source_rgb


def test_every_source_splits_into_disjoint_regions():
    for name in SOURCES:
        img = source_rgb(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        tr, te = regions(img)
        axis = 1 if img.shape[1] >= img.shape[0] else 0
        # the two regions tile the image exactly, so a crop inside one never overlaps the other
        np.testing.assert_array_equal(np.concatenate([tr, te], axis=axis), img)
        assert tr.shape[axis] > te.shape[axis] > 0 and min(te.shape[:2]) >= 64, name


def test_every_source_is_a_distinct_image_shipped_with_scikit_image(monkeypatch):
    import hashlib
    import socket

    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    images = {}
    for name in SOURCES:
        try:
            images[name] = source_rgb(name)
        except pytest.skip.Exception as e:  # scikit-image skips a pytest case whose data it would have to download
            pytest.fail(f"source {name!r} is not bundled with scikit-image: {e}")
    # 16 classes, 16 different pictures: SHA-256 of every source's pixels, and pixel comparison of every pair
    digests = {hashlib.sha256(img.tobytes()).hexdigest() + str(img.shape): n for n, img in images.items()}
    assert len(SOURCES) == 16 and len(set(SOURCES)) == 16 and len(digests) == 16
    for i, a in enumerate(SOURCES):
        for b in SOURCES[i + 1:]:
            assert not np.array_equal(images[a], images[b]), (a, b)
    # the replacement for the duplicate is scikit-image's colour motorcycle photograph (left stereo view)
    from skimage import data

    np.testing.assert_array_equal(images["motorcycle"], data.stereo_motorcycle()[0])
    assert images["motorcycle"].shape == (500, 741, 3) and np.abs(np.diff(images["motorcycle"].astype(int), axis=2)).mean() > 10
    # the loader returns exactly these images
    assert all(np.array_equal(v, images[k]) for k, v in distinct_sources().items())


def test_a_duplicate_source_is_refused(monkeypatch):
    from skimage import data

    # scikit-image's cat() and chelsea() are the same picture: the duplicate this data set once had
    assert np.array_equal(data.cat(), data.chelsea())
    with pytest.raises(ValueError, match="sources 'cat' and 'chelsea' are the same image"):
        photo_patches_split(1, 1, size=32, sources=("astronaut", "cat", "chelsea"))
    with pytest.raises(ValueError, match="'rocket' is listed twice"):
        photo_patches_part(1, 1, size=32, sources=("rocket", "coffee", "rocket"))
    # a planted duplicate under another name: "rocket" made to load the astronaut picture
    monkeypatch.setitem(photo_data._LOADERS, "rocket", lambda d: d.astronaut())
    with pytest.raises(ValueError, match="sources 'astronaut' and 'rocket' are the same image"):
        photo_patches_part(0, 1, size=32)
    # the same picture in grey is a different image (distinct pixels), accepted
    monkeypatch.setitem(photo_data._LOADERS, "rocket", lambda d: d.astronaut().mean(axis=2).astype(np.uint8))
    assert photo_patches_part(0, 1, size=32).raw.shape == (16, 32, 32, 3)


def test_split_is_deterministic_balanced_and_normalised():
    a_tr, a_te = photo_patches_split(2, 1, size=64, seed=3)
    b_tr, b_te = photo_patches_split(2, 1, size=64, seed=3)
    np.testing.assert_array_equal(a_tr.raw, b_tr.raw)
    np.testing.assert_array_equal(a_te.raw, b_te.raw)
    assert a_tr.images.shape == (2 * len(SOURCES), 3, 64, 64) and a_te.images.shape == (len(SOURCES), 3, 64, 64)
    assert torch.equal(torch.bincount(a_tr.labels), torch.full((len(SOURCES),), 2))
    # images are (raw / 255 - mean) / std, the preprocessing recorded for cvig_photos
    cfg = clustervig.get_config("cvig_photos")
    mean, std = np.array(cfg.mean).reshape(1, 3, 1, 1), np.array(cfg.std).reshape(1, 3, 1, 1)
    back = (a_tr.images.numpy() * std + mean) * 255.0
    np.testing.assert_allclose(back, a_tr.raw.transpose(0, 3, 1, 2).astype(np.float64), atol=1e-3)
    c_tr, _ = photo_patches_split(2, 1, size=64, seed=4)
    assert not np.array_equal(c_tr.raw, a_tr.raw)


def test_cvig_photos_has_the_papers_token_grid_and_depth():
    cfg = clustervig.get_config("cvig_photos")
    assert (cfg.img_size, cfg.grid, cfg.depth, cfg.clusters) == (224, 14, 12, 4)
    assert cfg.neighbors[0] == 9 and cfg.neighbors[-1] == 18 and cfg.gcn == "mr" and cfg.global_update
    assert cfg.num_classes == len(SOURCES) and tuple(cfg.class_names) == SOURCES


@pytest.mark.slow
def test_one_training_step_writes_a_checkpoint_with_its_recipe(tmp_path):
    from clustervig.checkpoint import model_from_checkpoint, recorded_config
    from clustervig.train import PhotoRecipe, train_photos

    out = tmp_path / "p.pth"
    res = train_photos(PhotoRecipe(epochs=1, train_per_class=2, test_per_class=1), out, log=lambda *a: None)
    assert 0.0 <= res["metrics"]["test_top1"] <= 1.0 and res["metrics"]["train_images"] == 2 * len(SOURCES)
    ck = torch.load(out, weights_only=False)
    assert ck["recipe"]["model"] == "cvig_photos" and ck["recipe"]["train_per_class"] == 2
    assert recorded_config(out)["name"] == "cvig_photos"
    model = model_from_checkpoint(out).eval()
    x = photo_patches_split(1, 1, seed=9)[1].images[:2]
    with torch.no_grad():
        assert torch.allclose(model(x), res["model"].eval()(x), atol=1e-5)
