"""Shared fixtures: numerically sane random models and hard-case token sets."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import clustervig
from clustervig.graph import kmeans_init_indices
from clustervig.utils import calibrate_batchnorm

# tests/installed/ tests the wheel installed in an environment of its own; .ci/run runs it there
collect_ignore_glob = [] if os.environ.get("CVIG_TEST_INSTALLED") else ["installed/*"]

# under pytest-xdist the cores are shared by the workers: one worker's torch must not take them all
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))
# ... nor its children's: the tools the tests start (cvig export, cvig-run, ...) read OMP_NUM_THREADS for torch and,
# through clustervig.utils.ort_session_options, for ONNX Runtime, whose threads then sleep instead of spin-waiting
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def make_model(name: str = "cvig_nano", gcn: str = "mr", seed: int = 0, calib_images=None, **kw):
    """A random-weight model whose BatchNorm statistics are set on real inputs.

    Without calibration the identity BN statistics let activations grow to
    ~1e6 and absolute tolerances become meaningless. A random (untrained)
    network only stays well scaled on the images its statistics came from, so
    tests that compare logits pass their inputs as ``calib_images`` (the
    statistics are frozen afterwards: the comparison itself runs in eval mode).
    """
    torch.manual_seed(seed)
    model = clustervig.create_model(name, gcn=gcn, **kw)
    if calib_images is None:
        calib_images = varied_images(4, model.cfg.img_size, seed + 1)
    calibrate_batchnorm(model, [calib_images])
    return model.eval()


def varied_images(b: int, size=224, seed: int = 0) -> torch.Tensor:
    """Images that differ in global statistics, not only in pixel noise (``size``: S for S x S, or (H, W)).

    Pure noise images all pool to nearly the same feature vector, so the head's
    BatchNorm would see ~zero variance and blow up on any other input.
    """
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + 1.5 * torch.rand(b, 1, 1, 1, generator=g)
    offset = torch.randn(b, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    freq = 1 + 4 * torch.rand(b, 3, 1, 1, generator=g)
    wave = torch.sin(freq * (xx + yy) * 3.14159)
    return offset + scale * (torch.randn(b, 3, h, w, generator=g) + wave)


@pytest.fixture(scope="module")
def nano_ckpt(tmp_path_factory):
    """A saved random-weight cvig_nano checkpoint (seeded; BatchNorm set on the sample photographs), as the
    export tests feed it to `cvig export --checkpoint`. Seeded because whether a k-means/k-NN decision of a
    random draw sits within float rounding of a tie (and flips between PyTorch and ORT) depends on the draw."""
    from clustervig import save_checkpoint
    from clustervig.preprocess import sample_photographs, transform_spec

    torch.manual_seed(0)
    model = clustervig.create_model("cvig_nano")
    calibrate_batchnorm(model, [sample_photographs(transform_spec(model.cfg))])
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "nano.pth")


@pytest.fixture(scope="session")
def nano_model():
    return make_model("cvig_nano")


def clustered_tokens(sizes, c: int = 16, noise: float = 0.05, seed: int = 0, dtype=torch.float64, anchor: bool = False):
    """Tokens forming well-separated groups of the given sizes, interleaved in token order.

    Returns (x [N, C], group [N]). Group g points along its own random direction.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((len(sizes), c))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    group = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
    rng.shuffle(group)
    if anchor:
        # put a member of group g at k-means' g-th initial index, so Lloyd starts
        # with one centroid per planted group and recovers the planted sizes
        for g, pos in enumerate(kmeans_init_indices(group.size, len(sizes))):
            swap = int(np.flatnonzero(group == g)[0])
            group[pos], group[swap] = group[swap], group[pos]
    x = dirs[group] + noise * rng.standard_normal((group.size, c))
    return torch.tensor(x, dtype=dtype), torch.tensor(group)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
