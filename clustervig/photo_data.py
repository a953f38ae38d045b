"""Photo patches: a labelled data set of real image content at 224 px, made offline from scikit-image.

ImageNet cannot be downloaded here; scikit-image ships real photographs and
textures. Each of :data:`SOURCES` is one class, and no two sources are the
same image (the loader hashes them and refuses a duplicate). Every source image is cut in
two regions along its longer side, the first two thirds for training and the
last third for testing, so no test crop overlaps a training crop. A sample is
a square crop of random side (35-100 % of the region's shorter side) at a
random place inside its region, mirrored with probability 1/2, with
brightness, contrast and saturation each scaled by a random factor in
[0.8, 1.2], resized to 224 px (PIL bilinear) and normalised with the model's
mean and std: the same steps a deployment applies to an image file.
Everything is drawn from ``numpy.random.default_rng(seed)``, one stream per
split, so a split is identical on every machine.

    train, test = photo_patches_split()          # 48 / 16 crops per class, 16 classes
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .data import Split, write_image_folder

# 16 distinct scikit-image images that ship inside the package (no download): photographs, scans and textures.
# skimage.data.cat() is chelsea() (the same pixels), so it is not a source; "motorcycle" is the left view of
# stereo_motorcycle() (a colour photograph, 500 x 741; the right view is nearly the same picture, so not a source).
SOURCES = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
           "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle", "retina", "rocket")
# sources that are not a skimage.data function of the same name: name -> how to get the image from skimage.data
_LOADERS = {"motorcycle": lambda data: data.stereo_motorcycle()[0]}
TRAIN_FRACTION = 2 / 3
MIN_SIDE, MAX_SIDE = 0.35, 1.0
JITTER = 0.2


def source_rgb(name: str) -> np.ndarray:
    """One source image as uint8 RGB [H, W, 3] (grayscale repeated, alpha dropped)."""
    from skimage import data

    a = np.asarray(_LOADERS[name](data) if name in _LOADERS else getattr(data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def source_digest(img: np.ndarray) -> str:
    """SHA-256 of a source image's shape and pixels (as :func:`source_rgb` returns it)."""
    h = hashlib.sha256(repr((img.shape, str(img.dtype))).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def distinct_sources(sources: Sequence[str] = SOURCES) -> Dict[str, np.ndarray]:
    """name -> :func:`source_rgb` image for every source; ValueError naming both classes when two sources
    are the same image (identical pixels: one would be two labels for one picture) or a name is repeated."""
    images: Dict[str, np.ndarray] = {}
    seen: Dict[str, str] = {}
    for name in sources:
        if name in images:
            raise ValueError(f"photo-patches source {name!r} is listed twice: every class needs its own image")
        img = source_rgb(name)
        digest = source_digest(img)
        if digest in seen:
            raise ValueError(f"photo-patches sources {seen[digest]!r} and {name!r} are the same image "
                             f"(sha256 {digest[:16]}...): two classes would have identical content")
        seen[digest] = name
        images[name] = img
    return images


def regions(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(train region, test region): the first two thirds and the last third along the longer side."""
    h, w = img.shape[:2]
    if w >= h:
        cut = int(round(w * TRAIN_FRACTION))
        return img[:, :cut], img[:, cut:]
    cut = int(round(h * TRAIN_FRACTION))
    return img[:cut], img[cut:]


def _jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = rgb.astype(np.float32) / 255.0
    b, c, s = rng.uniform(1 - JITTER, 1 + JITTER, 3)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * s + gray[..., None]
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def random_crops(region: np.ndarray, count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` augmented square crops of ``region`` as uint8 [count, size, size, 3]."""
    from PIL import Image

    h, w = region.shape[:2]
    short = min(h, w)
    out = []
    for _ in range(count):
        side = max(8, int(round(short * rng.uniform(MIN_SIDE, MAX_SIDE))))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = region[y0 : y0 + side, x0 : x0 + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = _jitter(crop, rng)
        out.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def normalise(raw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [M, S, S, 3] -> float [M, 3, S, S], (x / 255 - mean) / std."""
    t = torch.from_numpy(raw.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (t - m) / s


def photo_patches_split(train_per_class: int = 48, test_per_class: int = 16, size: int = 224, seed: int = 0,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                        sources: Sequence[str] = SOURCES) -> Tuple[Split, Split]:
    """(train, test) Splits; ``raw`` holds the uint8 RGB crops [M, size, size, 3] for writing image files."""
    return (photo_patches_part(0, train_per_class, size, seed, mean, std, sources),
            photo_patches_part(1, test_per_class, size, seed, mean, std, sources))


def photo_patches_part(part: int, per_class: int, size: int = 224, seed: int = 0,
                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                       sources: Sequence[str] = SOURCES) -> Split:
    """One split alone: ``part`` 0 = training crops, 1 = held-out crops (each split has its own random
    stream, so the held-out crops do not depend on how many training crops were drawn)."""
    if part not in (0, 1):
        raise ValueError(f"part must be 0 (training) or 1 (held out), not {part}")
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, not {per_class}")
    images = distinct_sources(sources)
    rng = np.random.default_rng([seed, part])
    raws: List[np.ndarray] = []
    labels: List[int] = []
    for label, name in enumerate(sources):
        region = regions(images[name])[part]
        raws.append(random_crops(region, per_class, size, rng))
        labels += [label] * per_class
    raw = np.concatenate(raws)
    return Split(normalise(raw, mean, std), torch.tensor(labels, dtype=torch.int64), raw)


def write_photo_folder(split: Split, out_dir, per_class: int = 0, sources: Sequence[str] = SOURCES):
    """Write crops as PNG files ``out_dir/<source>/<i>.png`` (for cvig export --calib-dir, cvig accuracy --folder)."""
    return write_image_folder(split, out_dir, per_class, names=sources)
