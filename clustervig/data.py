"""Offline data sets: scikit-learn's handwritten digits as ClusterViG images.

The digits (1,797 real 8x8 scans, values 0..16) are the one real labelled
image set that installs with a package and needs no download. They become
32x32 RGB images by the same steps a deployment applies to an image file:
uint8 grayscale -> PIL bilinear resize -> RGB -> /255 -> (x - mean) / std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor


@dataclass
class Split:
    images: Tensor  # [M, 3, S, S] float32, normalised
    labels: Tensor  # [M] int64
    raw: np.ndarray  # [M, 8, 8] uint8 scans (0..255), for writing image files


def digits_uint8() -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 8x8 images (0..255) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return img, d.target.astype(np.int64)


def to_tensor(raw: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 grayscale [M, h, w] -> normalised float [M, 3, size, size] (PIL bilinear resize)."""
    from PIL import Image

    out = np.stack([
        np.asarray(Image.fromarray(r, mode="L").convert("RGB").resize((size, size), Image.BILINEAR))
        for r in raw
    ]).astype(np.float32) / 255.0  # [M, S, S, 3]
    t = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (t - m) / s


def digits_split(size: int = 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), test_size: float = 0.2,
                 seed: int = 0) -> Tuple[Split, Split]:
    """Stratified train/test split (default 1,437 / 360 images), fixed by ``seed``."""
    from sklearn.model_selection import train_test_split

    raw, y = digits_uint8()
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)
    mk = lambda ii: Split(to_tensor(raw[ii], size, mean, std), torch.from_numpy(y[ii]), raw[ii])  # noqa: E731
    return mk(tr), mk(te)


def write_image_folder(split: Split, out_dir: Path, per_class: int = 0, names: Optional[Sequence[str]] = None) -> Path:
    """Write a split's raw images as PNG files ``out_dir/<class>/<i>.png`` (as a user would have them); the
    class folder is ``names[label]``, or the label itself (the digits' scans: ``out_dir/<digit>/``)."""
    from PIL import Image

    out_dir = Path(out_dir)
    counts: dict = {}
    for i, (r, lab) in enumerate(zip(split.raw, split.labels.tolist())):
        if per_class and counts.get(lab, 0) >= per_class:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        d = out_dir / (names[lab] if names is not None else str(lab))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(r).save(d / f"{i:04d}.png")  # uint8 [h, w] -> L, [h, w, 3] -> RGB
    return out_dir
