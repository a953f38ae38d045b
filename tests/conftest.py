"""Shared fixtures: numerically sane random models and hard-case token sets."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import clustervig
from clustervig.utils import calibrate_batchnorm

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def make_model(name: str = "cvig_nano", gcn: str = "mr", seed: int = 0, calib_batch: int = 4, **kw):
    """A random-weight model whose BatchNorm statistics are set on random images.

    Without calibration the identity BN statistics let activations grow to
    ~1e6 and absolute tolerances become meaningless.
    """
    torch.manual_seed(seed)
    model = clustervig.create_model(name, gcn=gcn, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    size = model.cfg.img_size
    calibrate_batchnorm(model, [torch.randn(calib_batch, 3, size, size, generator=g)])
    return model.eval()


@pytest.fixture(scope="session")
def nano_model():
    return make_model("cvig_nano")


def clustered_tokens(sizes, c: int = 16, noise: float = 0.05, seed: int = 0, dtype=torch.float64):
    """Tokens forming well-separated groups of the given sizes, interleaved in token order.

    Returns (x [N, C], group [N]). Group g points along its own random direction.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((len(sizes), c))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    group = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
    rng.shuffle(group)
    x = dirs[group] + noise * rng.standard_normal((group.size, c))
    return torch.tensor(x, dtype=dtype), torch.tensor(group)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None
