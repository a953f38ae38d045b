"""The PyTorch path on the plugin kernels (``create_model(..., kernels=True)``) equals the pure static form, on CPU.

On CPU tensors ``torch.ops.cvig.*`` run the host build of the kernels; the
same ops run the CUDA build on CUDA tensors (tests/test_plugin_kernels_gpu.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import clustervig
from clustervig.graph import kmeans, knn_masked, segment_mean
from clustervig.plugins import torch_ops

from conftest import make_model


def photos_for(model):
    from clustervig.preprocess import sample_photographs, transform_spec

    return sample_photographs(transform_spec(model.cfg))


def trace(model, x):
    """Logits, and per block the normalised tokens and the (idx, valid) handed to the local update."""
    xn, nb = [], []
    hooks = []
    for d in model.degc_modules():
        hooks.append(d.norm.register_forward_hook(lambda m, i, o: xn.append(o.detach().clone())))
        hooks.append(d.local.register_forward_pre_hook(
            lambda m, a, kw: nb.append((kw["idx"].clone(), kw["valid"].clone())), with_kwargs=True))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, xn, nb


@pytest.mark.parametrize("name,gcn,seed", [("cvig_nano", "mr", 0), ("cvig_nano", "edge", 1), ("cvig_nano", "sage", 2),
                                           ("cvig_nano", "gin", 3), ("cvig_ti", "mr", 1)])
def test_kernel_path_equals_static_form(name, gcn, seed):
    torch.manual_seed(seed)
    probe = clustervig.create_model(name)
    x = photos_for(probe)
    model = make_model(name, gcn=gcn, seed=seed, calib_images=x)
    ref_logits, ref_xn, ref_nb = trace(model, x)
    model.set_kernels(True)
    assert model.kernels
    logits, xn, nb = trace(model, x)
    model.set_kernels(False)
    assert not model.kernels
    # end to end: every block's neighbour sets (hence partitions) identical, logits within 1e-4. Sets, not
    # slot order: similarities equal up to the last float bit may swap places between a BLAS matmul and
    # the kernel's fixed-tree dot product; every local update aggregates over the set
    for i, ((ri, rv), (ki, kv)) in enumerate(zip(ref_nb, nb)):
        assert torch.equal(ri.sort(-1).values, ki.sort(-1).values) and torch.equal(rv, kv), f"neighbours of block {i}"
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    # teacher-forced, on the pure form's own tokens: k-means labels and k-NN identical
    for d, t in zip(model.degc_modules(), ref_xn):
        lab, counts = torch_ops.kmeans(t, d.clusters, d.kmeans.iters)
        assert torch.equal(lab.long(), kmeans(t, d.clusters, d.kmeans.iters))
        assert torch.equal(counts.long(), torch.bincount(lab.flatten().long() + d.clusters * torch.arange(
            t.shape[0]).repeat_interleave(t.shape[1]), minlength=d.clusters * t.shape[0]).view(t.shape[0], -1))
        idx, valid = torch_ops.partitioned_knn(t, lab, d.k)
        ri, rv = knn_masked(t, lab.long(), d.k)
        assert torch.equal(idx.long().sort(-1).values, ri.sort(-1).values) and torch.equal(valid.bool(), rv)
        assert torch.equal(idx[..., 0].long(), ri[..., 0])  # self first


def test_kernel_segment_mean_and_gather_match_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 97, 24, generator=g)
    labels = torch.randint(0, 5, (3, 97), generator=g, dtype=torch.int32)
    labels[2] = labels[2].clamp(max=1)  # empty partitions 2..4 in image 2
    z, counts = torch_ops.segment_mean(x, labels, 5)
    rz, rc = segment_mean(x.double(), labels.long(), 5)
    assert torch.allclose(z.double(), rz, atol=1e-6, rtol=0) and torch.equal(counts.double(), rc)
    idx = torch.randint(0, 97, (3, 97, 7), generator=g)
    from clustervig.graph import gather_max

    assert torch.equal(torch_ops.gather_max_rel(x, idx), gather_max(x, idx) - x)


def test_kernel_path_digits_accuracy_unchanged():
    from clustervig.data import digits_split
    from clustervig.train import WEIGHTS_DIR

    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    _, te = digits_split()
    with torch.inference_mode():
        pure = model(te.images)
        fast = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth", kernels=True).eval()(te.images)
    assert (pure - fast).abs().max().item() <= 1e-4
    assert torch.equal(pure.argmax(1), fast.argmax(1))
    assert (fast.argmax(1) == te.labels).float().mean().item() >= 0.97


def test_kernel_path_rules():
    m = clustervig.create_model("cvig_nano", form="reference")
    with pytest.raises(ValueError, match="kernels=True needs form='static'"):
        m.set_kernels(True)
    with pytest.warns(UserWarning, match="capacity=40 is not applied"):
        clustervig.create_model("cvig_nano", knn="padded", capacity=40, kernels=True)
    # inference only: backward through the kernels raises instead of giving wrong gradients
    m = clustervig.create_model("cvig_nano", kernels=True).eval()
    with pytest.raises(RuntimeError, match="no autograd formula"):
        m(torch.randn(1, 3, 224, 224)).sum().backward()


def test_onnx_export_of_a_kernel_model_is_the_pure_graph(tmp_path):
    import onnx

    from clustervig.export.onnx_export import BatchSpec, export_onnx

    model = make_model("cvig_nano", seed=0)
    model.set_kernels(True)
    export_onnx(model, tmp_path / "k.onnx", BatchSpec(1, 1, 1), simplify=False)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node}
    assert "ArgMin" in ops and "TopK" in ops and not any(o.startswith("Cvig") or "cvig" in o for o in ops)


def test_kernel_ops_under_torch_compile_shapes():
    # the fake (meta) implementations give the kernels' shapes and dtypes
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xn = torch.empty(2, 50, 8)
        lab, cnt = torch.ops.cvig.kmeans(xn, 4, 20)
        idx, valid = torch.ops.cvig.partitioned_knn(xn, lab, 9)
        z, c = torch.ops.cvig.segment_mean(xn, lab, 4)
        out = torch.ops.cvig.gather_max_rel(xn, idx)
    assert (tuple(lab.shape), tuple(cnt.shape), tuple(idx.shape), tuple(z.shape), tuple(out.shape)) == \
        ((2, 50), (2, 4), (2, 50, 9), (2, 4, 8), (2, 50, 8))
    assert lab.dtype == cnt.dtype == idx.dtype == valid.dtype == c.dtype == torch.int32 and z.dtype == torch.float32
    np.testing.assert_equal(out.dtype, torch.float32)
