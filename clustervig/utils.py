"""Small helpers shared by tests, demos and the export tools."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Union

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; on success it replaces ``path`` (with the usual
    file mode, not mkstemp's 0600), on any error or interrupt it is removed: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Union[str, Path], obj, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics from ``batches``, in eval mode.

    A freshly initialised network has identity BN statistics, so activations
    grow block after block and logits reach 1e6. Train-mode statistics do not
    fix that for ClusterViG: k-means is chaotic under the tiny difference
    between batch and running statistics, partitions then differ between the
    calibration pass and inference, and the mismatch compounds to 1e9 logits.
    So each BN takes the exact mean/variance of the input it sees in an
    *eval-mode* pass, in forward order (a pre-hook fills the statistics just
    before the layer runs), which makes inference on these images exactly
    normalised. All batches are concatenated into one pass. Used to make
    random-weight models numerically realistic for tests, demos and exports
    without a checkpoint. Returns the model in eval mode.
    """
    x = torch.cat(list(batches), dim=0)

    def fill(bn: nn.modules.batchnorm._BatchNorm, args) -> None:
        inp = args[0]
        dims = [d for d in range(inp.ndim) if d != 1]
        bn.running_mean.copy_(inp.mean(dim=dims))
        bn.running_var.copy_(inp.var(dim=dims, unbiased=False))

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(fill) for bn in bns]
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return model
