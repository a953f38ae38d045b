"""Calibration data: an image folder or arrays, preprocessed exactly as the model expects."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from clustervig.preprocess import IMAGE_SUFFIXES, ImageError, load_batch

EXTS = set(IMAGE_SUFFIXES)  # the one accepted set (PNG and JPEG), as load_image and the C++ runtime


class CalibrationDataError(ValueError):
    pass


def image_files(folder: Path, what: str = "calibration folder") -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationDataError(f"{what} {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTS and p.is_file())
    if not files:
        raise CalibrationDataError(f"{what} {folder} holds no JPEG/PNG images")
    return files


def labelled_files(folder: Path, names: Sequence[str] = (), num_classes: Optional[int] = None
                   ) -> Tuple[List[Path], np.ndarray]:
    """The images of a labelled folder ``DIR/<class name or index>/<image>`` (sorted, recursive) and their
    class indices: a folder named like one of ``names`` is that class, a number is the class index."""
    files = image_files(folder, "labelled folder")
    labels = []
    for f in files:
        cls = f.parent.name
        if cls in names:
            labels.append(list(names).index(cls))
        elif cls.isdigit():
            labels.append(int(cls))
        else:
            known = f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""
            raise CalibrationDataError(f"{f}: its folder {cls!r} is neither one of the model's class names{known} nor a "
                                       "class index: arrange the images as DIR/<class name or index>/<image>")
        if num_classes is not None and labels[-1] >= num_classes:
            raise CalibrationDataError(f"{f}: class index {labels[-1]} is out of range for a model with {num_classes} "
                                       "classes")
    return files, np.asarray(labels, dtype=np.int64)


def folder_batches(folder: Path, spec: Dict, samples: int, batch: int = 8, min_samples: int = 1) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches from up to ``samples`` images of ``folder`` (sorted, recursive)."""
    yield from file_batches(calibration_files(folder, samples, min_samples), spec, batch)


def array_batches(images: np.ndarray, spec: Dict, batch: int = 8, min_samples: int = 1) -> Iterator[np.ndarray]:
    """Batches from an already preprocessed [M, 3, S, S] array, checked against the model's size."""
    s = int(spec["img_size"])
    if images.ndim != 4 or images.shape[1:] != (3, s, s):
        raise CalibrationDataError(f"calibration arrays must be [M, 3, {s}, {s}], got {list(images.shape)}")
    if len(images) < min_samples:
        raise CalibrationDataError(f"{len(images)} calibration samples given; at least {min_samples} are needed")
    for i in range(0, len(images), batch):
        yield np.ascontiguousarray(images[i : i + batch], dtype=np.float32)


def calibration_files(folder: Path, samples: int, min_samples: int = 1) -> List[Path]:
    """The images a calibration uses: the first ``samples`` of ``folder`` (sorted, recursive), at least
    ``min_samples`` of them. Counted before any long work so a short folder fails at once."""
    files = image_files(folder)[:samples]
    if len(files) < min_samples:
        raise CalibrationDataError(f"calibration folder {folder} has {len(files)} images; at least {min_samples} are "
                                   "needed (--calib-samples)")
    return files


def file_batches(files: List[Path], spec: Dict, batch: int = 8) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches of ``files``."""
    for i in range(0, len(files), batch):
        try:
            yield load_batch(files[i : i + batch], spec).numpy()
        except ImageError as exc:
            raise CalibrationDataError(f"calibration image unusable: {exc}") from None
