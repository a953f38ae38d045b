"""Image preprocessing that matches a model's recorded transform (timm-style eval transform).

resize the shorter side to ``img_size / crop_pct`` -> center crop ``img_size`` ->
RGB float in [0, 1] -> (x - mean) / std. Shared by the export validation, the
runtime and the calibration data loaders so every stage sees identical inputs.
A non-square ``img_size`` [H, W] (a backbone built for a detection resolution)
resizes, keeping the aspect ratio, to the smallest size that covers
[H / crop_pct, W / crop_pct], then center-crops H x W; for H = W that is the
rule above.
"""
from __future__ import annotations

import math
import re
import struct
import sys
import warnings
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .model import as_hw

_INTERP = {"bilinear": 2, "bicubic": 3, "nearest": 0}  # PIL.Image resampling codes


class ImageError(ValueError):
    """An image file that cannot be used (missing, not PNG/JPEG, truncated or corrupt, too large)."""


# The one accepted set of image files, identical in the C++ runtime (runtime/cpp/src/image.cpp): PNG and JPEG,
# told apart by content, not by name. Other formats are named from their magic bytes, as in C++.
ACCEPTED_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # names of the accepted files, for folder scans


def sniff_format(head: bytes) -> str:
    """The format of a file from its first bytes: "PNG", "JPEG", another format's name, "empty" or ""."""
    if not head:
        return "empty"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1"):
        return "HEIF"
    if head.startswith(b"\0\0\0\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\0\0\0\x0cJXL "):
        return "JPEG XL"
    if head.startswith(b"\0\0\x01\0"):
        return "ICO"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"%PDF"):
        return "PDF"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "PNM"
    return ""


def _format_error(path: Path, head: bytes) -> ImageError:
    fmt = sniff_format(head)
    if fmt == "empty":
        return ImageError(f"image {path} is empty (0 bytes)")
    what = f"a {fmt} file" if fmt else f"not a PNG or JPEG file (unrecognised content: {head[:8].hex(' ')})"
    return ImageError(f"image {path} is {what}; only PNG and JPEG images are accepted (told by content, not by "
                      "name): convert it to PNG or JPEG first")


def _to_rgb(img, path: Path):
    """PIL's conversion to 8-bit RGB, with 16-bit gray reduced to its high byte (as PIL does for 16-bit RGB/RGBA/LA
    PNGs) instead of PIL's clipping of I;16/I values at 255."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        hi = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(hi[..., None], 3, axis=2))
    if mode in ("1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK"):
        # alpha and transparency are dropped, not composited; palettes give their colours; CMYK uses PIL's
        # Adobe-inverted formula. PIL's hint to convert transparent palette images to RGBA is moot here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return img.convert("RGB")
    raise ImageError(f"image {path} has mode {mode} ({len(img.getbands())} channels), which is not read; "
                     "convert it to an 8-bit RGB or grayscale PNG or JPEG first")


def load_image(path: Union[str, Path]):
    """Open a PNG or JPEG file (told by content) as an 8-bit RGB PIL image: PIL's conversion to RGB, 16-bit samples
    reduced to their high byte, alpha dropped. Anything else raises ImageError naming the file and the fix.

    The C++ runtime (cvig::loadImage) decodes the same files to exactly the same bytes and refuses the same ones.
    Images above PIL's decompression-bomb limit (2 x PIL.Image.MAX_IMAGE_PIXELS) raise ImageError; images above
    PIL's warning threshold (MAX_IMAGE_PIXELS) are read, with a one-line note on stderr.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image {path} is a directory, not an image file" if path.is_dir()
                         else f"image {path} does not exist")
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise ImageError(f"image {path} cannot be read ({exc})") from None
    if sniff_format(head) not in ACCEPTED_FORMATS:
        raise _format_error(path, head)
    img = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path, formats=["PNG", "JPEG"])
        img.load()
    except Image.DecompressionBombError as exc:
        m = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = m.group(1) if m else "too many"
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(f"image {path} has {pixels} pixels, more than the limit of {limit} pixels; downscale it "
                         "first (for a trusted file, raise PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
            zlib.error) as exc:
        if img is not None:
            img.close()
        kind = "PNG" if head.startswith(b"\x89PNG") else "JPEG"
        raise ImageError(f"image {path} could not be read ({exc}); is it a complete, uncorrupted {kind} file?") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            wd, ht = img.size
            sys.stderr.write(f"note: image {path} has {wd * ht} pixels ({wd} x {ht}), more than PIL's "
                             f"decompression-bomb threshold of {Image.MAX_IMAGE_PIXELS}; reading it anyway\n")
        else:  # anything else PIL warns about while opening is passed on as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        rgb = _to_rgb(img, path)
    except ImageError:
        img.close()
        raise
    if rgb is not img:
        img.close()
    elif getattr(img, "n_frames", 1) > 1:  # APNG/MPO keep their file open for more frames: only the first is read
        rgb = img.copy()
        img.close()
    return rgb


def transform_spec(cfg) -> Dict:
    """The preprocessing recorded with an export (from a ClusterViGConfig)."""
    h, w = cfg.img_hw
    return {
        "img_size": h if h == w else [h, w],  # one int for a square input, as before
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
    }


def spec_hw(spec: Dict) -> "tuple[int, int]":
    """(H, W) of a recorded preprocessing: ``img_size`` is one int (square) or [H, W]."""
    return as_hw(spec["img_size"])


def preprocess_pil(img, spec: Dict) -> Tensor:
    """PIL RGB image -> normalised float tensor [3, H, W] (``img_size``: S for S x S, or [H, W])."""
    from PIL import Image

    out_h, out_w = spec_hw(spec)
    crop = float(spec.get("crop_pct", 1.0))
    th, tw = int(math.floor(out_h / crop)), int(math.floor(out_w / crop))
    w, h = img.size
    if tw * h >= th * w:  # the width needs the larger scale (square: the shorter side is the width)
        nw, nh = tw, max(1, int(round(h * tw / w)))
    else:
        nw, nh = max(1, int(round(w * th / h))), th
    img = img.resize((nw, nh), _INTERP.get(spec.get("interpolation", "bilinear"), Image.BILINEAR))
    left, top = (nw - out_w) // 2, (nh - out_h) // 2
    img = img.crop((left, top, left + out_w, top + out_h))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std


def load_batch(paths: Iterable[Union[str, Path]], spec: Dict) -> Tensor:
    return torch.stack([preprocess_pil(load_image(p), spec) for p in paths])


def sample_photographs(spec: Dict, names: Sequence[str] = ("astronaut", "coffee", "chelsea", "rocket")) -> Tensor:
    """Real photographs shipped with scikit-image, preprocessed: [len(names), 3, H, W]."""
    from PIL import Image
    from skimage import data

    out: List[Tensor] = []
    for name in names:
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(preprocess_pil(Image.fromarray(arr[..., :3]), spec))
    return torch.stack(out)
