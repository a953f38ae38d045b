"""Small helpers shared by tests, demos and the export tools."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to the exact mean/var over ``batches``.

    A freshly initialised network has identity BN statistics, so activations
    grow block after block and logits reach 1e6; after this, activations are
    normalised as in a trained network. Used to make random-weight models
    numerically realistic for tests, demos and exports without a checkpoint.
    The model is returned in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over batches
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return model.eval()
