"""Image preprocessing that matches a model's recorded transform (timm-style eval transform).

resize the shorter side to ``img_size / crop_pct`` -> center crop ``img_size`` ->
RGB float in [0, 1] -> (x - mean) / std. Shared by the export validation, the
runtime and the calibration data loaders so every stage sees identical inputs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor

_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image resampling codes


class ImageError(ValueError):
    """An image file that cannot be used (missing, unreadable, wrong channel count)."""


def transform_spec(cfg) -> Dict:
    """The preprocessing recorded with an export (from a ClusterViGConfig)."""
    return {
        "img_size": cfg.img_size,
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }


def load_image(path: Union[str, Path]):
    """Open an image file as RGB PIL image; grayscale is expanded, other modes are refused."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"image {path} could not be read ({exc}); is it a complete JPEG/PNG file?") from None
    if img.mode in ("L", "I;16", "I", "P", "LA"):
        img = img.convert("RGB")
    elif img.mode == "RGBA":
        img = img.convert("RGB")
    elif img.mode != "RGB":
        raise ImageError(f"image {path} has mode {img.mode} ({len(img.getbands())} channels); "
                         "convert it to RGB or grayscale first")
    return img


def preprocess_pil(img, spec: Dict) -> Tensor:
    """PIL RGB image -> normalised float tensor [3, S, S]."""
    from PIL import Image

    size = int(spec["img_size"])
    scale = int(math.floor(size / float(spec.get("crop_pct", 1.0))))
    w, h = img.size
    if w <= h:
        nw, nh = scale, max(1, int(round(h * scale / w)))
    else:
        nw, nh = max(1, int(round(w * scale / h))), scale
    img = img.resize((nw, nh), _INTERP.get(spec.get("interpolation", "bilinear"), Image.BILINEAR))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std


def load_batch(paths: Iterable[Union[str, Path]], spec: Dict) -> Tensor:
    return torch.stack([preprocess_pil(load_image(p), spec) for p in paths])


def sample_photographs(spec: Dict, names: Sequence[str] = ("astronaut", "coffee", "chelsea", "rocket")) -> Tensor:
    """Real photographs shipped with scikit-image, preprocessed: [len(names), 3, S, S]."""
    from PIL import Image
    from skimage import data

    out: List[Tensor] = []
    for name in names:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(preprocess_pil(Image.fromarray(arr[..., :3]), spec))
    return torch.stack(out)
