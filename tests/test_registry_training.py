"""Registry, input validation, and training steps in both forms."""
from __future__ import annotations

import pytest
import torch

import clustervig
from clustervig.registry import get_config


def test_list_models_and_configs():
    assert clustervig.list_models() == ["cvig_b", "cvig_b_hr", "cvig_digits", "cvig_nano", "cvig_photos", "cvig_s",
                                        "cvig_ti"]
    ti = get_config("cvig_ti")
    assert (ti.dim, ti.depth, ti.tokens, ti.clusters, ti.groups) == (192, 12, 196, 4, 1)
    hr = get_config("cvig_b_hr")
    assert (hr.dim, hr.depth, hr.tokens, hr.clusters) == (640, 16, 784, 6)
    # K grows from 9 to 18 over the blocks: int() of a float32 linspace
    assert ti.neighbors == [9, 9, 10, 11, 12, 13, 13, 14, 15, 16, 17, 18]
    assert get_config("cvig_s").neighbors[0] == 9 and get_config("cvig_s").neighbors[-1] == 18
    assert hr.knn_mode == "masked" and get_config("cvig_nano", grid=56, img_size=224).knn_mode == "padded"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="cvig_xl"), "unknown model 'cvig_xl'"),
        (dict(name="cvig_nano", gcn="gat"), "unknown gcn"),
        (dict(name="cvig_nano", form="dynamic"), "form must be"),
        (dict(name="cvig_nano", knn="approx"), "knn must be"),
        (dict(name="cvig_nano", colour=True), r"unknown option\(s\) \['colour'\]"),
        (dict(name="cvig_nano", grid=13), "power of two"),
        (dict(name="cvig_nano", capacity=0), "capacity must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        clustervig.create_model(**kwargs)


def test_wrong_input_shape_is_explained(nano_model):
    with pytest.raises(ValueError, match=r"expects images \[B, 3, 224, 224\].*got \[1, 3, 200, 200\]"):
        nano_model(torch.zeros(1, 3, 200, 200))


@pytest.mark.parametrize("form", ["static", "reference"])
@pytest.mark.parametrize("gcn", ["mr", "edge", "sage", "gin"])
def test_train_step_reaches_every_parameter(form, gcn):
    torch.manual_seed(0)
    model = clustervig.create_model("cvig_nano", gcn=gcn, form=form, num_classes=5, drop_path=0.1).train()
    x = torch.randn(4, 3, 224, 224)
    y = torch.tensor([0, 1, 2, 3])
    cls, dist = model(x)  # training returns both heads
    loss = torch.nn.functional.cross_entropy(cls, y) + torch.nn.functional.cross_entropy(dist, y)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    # one SGD step changes the loss
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opt.step()
    torch.manual_seed(0)
    cls2, dist2 = model(x)
    loss2 = torch.nn.functional.cross_entropy(cls2, y) + torch.nn.functional.cross_entropy(dist2, y)
    assert loss2.item() != pytest.approx(loss.item(), abs=1e-6)


def test_state_dict_identical_between_forms():
    a = clustervig.create_model("cvig_nano", form="static")
    b = clustervig.create_model("cvig_nano", form="reference")
    assert list(a.state_dict()) == list(b.state_dict())
    assert "blocks.0.grapher.degc.gat.lin_l.weight" in a.state_dict()


def test_vig_baseline_has_full_knn_and_no_global_update():
    from clustervig.graph import knn_masked, l2_normalize

    model = clustervig.create_model("cvig_nano", clusters=1, global_update=False).eval()
    assert not any(".gat." in k or k.endswith(".delta") for k in model.state_dict())
    assert model.blocks[0].grapher.degc.local.nn[0].in_channels == 2 * model.cfg.dim  # [x, max_rel]
    torch.manual_seed(0)
    xn = l2_normalize(torch.randn(1, 30, 8, dtype=torch.float64))
    labels = model.blocks[0].grapher.degc.kmeans(xn)
    assert labels.eq(0).all()
    idx, valid = knn_masked(xn, labels, 5)
    sim = (xn[0] @ xn[0].T).numpy()
    for v in range(30):
        order = sorted(range(30), key=lambda u: (u != v, -sim[v, u], u))[:5]  # self first
        assert idx[0, v].tolist() == order
    assert valid.all()
    ref = clustervig.create_model("cvig_nano", clusters=1, global_update=False, form="reference").eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
