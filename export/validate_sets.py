"""Labelled held-out images for ``cvig export --validate-set``.

The photographs and random inputs that every export is validated on say
whether an artifact reproduces PyTorch; they carry no labels. A labelled set
adds what a user decides on: top-1 accuracy of PyTorch and of every artifact,
beside their agreement, measured on images the model was not trained on.

Sets: ``digits`` (the held-out split of scikit-learn's digits, 10 classes),
``photo-patches`` (the held-out crops of :mod:`clustervig.photo_data`, 16
classes) and any folder ``DIR/<class name or index>/<image>``. The built-in
splits are drawn as the checkpoint's training recipe drew them (its split
seed, test size / crops per class), so they never overlap its training data.
``--validate-images N`` takes the first N in round-robin class order, so a
slice covers every class equally.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from clustervig.calib.data import CalibrationDataError, image_files, labelled_files
from clustervig.preprocess import ImageError, load_batch, transform_spec

BUILTIN_SETS = {
    "digits": "held-out split of scikit-learn's digits (360 scans, 10 classes)",
    "photo-patches": "held-out crops of clustervig.photo_data (16 per class, 16 classes)",
}
FOLDER_SET = "labelled"  # report key of a folder's images


class ValidateSetError(ValueError):
    """A --validate-set that cannot be used with this model."""


@dataclass
class LabelledSet:
    name: str  # the report's key: a built-in name or "labelled"
    source: str  # what the images are, for the report
    images: torch.Tensor  # normalised as the PyTorch model takes them
    labels: np.ndarray  # class index per image
    available: int  # images in the whole set, before --validate-images

    def describe(self) -> Dict:
        return {"name": self.name, "source": self.source, "images": int(len(self.labels)),
                "available": self.available, "classes": int(len(np.unique(self.labels)))}


def check_validate_set(spec: str) -> None:
    """Before any work: a built-in name, or a folder that holds images."""
    if spec in BUILTIN_SETS:
        return
    try:
        image_files(Path(spec), "labelled folder")  # the class folders are checked against the model once it is built
    except CalibrationDataError as exc:
        raise ValidateSetError(f"--validate-set {spec}: {exc}; or name a built-in set: "
                               f"{', '.join(BUILTIN_SETS)}") from None


def round_robin(labels: np.ndarray) -> np.ndarray:
    """Indices ordered class by class in turn (first of each class, then second, ...); within a class
    the set's own order is kept."""
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    return np.lexsort((labels, rank))


def _chosen(labels: np.ndarray, limit: int, multiple: int) -> np.ndarray:
    order = round_robin(labels)
    n = len(order) if limit == 0 else min(limit, len(order))
    n -= n % multiple
    if n == 0:
        raise ValidateSetError(f"--validate-set holds {len(order)} images, fewer than one batch of {multiple} "
                               "(the static batch size): add images or export with a smaller --batch")
    return np.sort(order[:n])  # the set's own order: class by class, as its files are sorted


def model_class_names(cfg) -> Optional[List[str]]:
    """Recorded class names, else the ImageNet-1k names for a 1000-class model, else None (labels.txt and
    the folder names of a labelled set follow the same rule)."""
    from clustervig.runtime.classify import imagenet1k_names

    return list(cfg.class_names) if cfg.class_names else (imagenet1k_names() if cfg.num_classes == 1000 else None)


def _class_names(cfg) -> List[str]:
    return model_class_names(cfg) or []


def _require_classes(set_name: str, cfg, want: Sequence[str]) -> List[int]:
    """Model class index of each of the set's classes ``want`` (by name when the model records names)."""
    names = _class_names(cfg)
    if cfg.num_classes != len(want) or (names and sorted(names) != sorted(want)):
        have = f"{cfg.num_classes} classes" + (f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else "")
        raise ValidateSetError(f"--validate-set {set_name} scores {len(want)} classes ({', '.join(want[:6])}"
                               f"{', ...' if len(want) > 6 else ''}), and {cfg.name} has {have}: use a folder "
                               "DIR/<class name or index>/<image> of the model's own classes")
    return [names.index(w) for w in want] if names else list(range(len(want)))


def load_validate_set(spec: str, cfg, recipe: Optional[Mapping] = None, limit: int = 0, multiple: int = 1) -> LabelledSet:
    """The labelled images of ``spec`` for a model of config ``cfg``: at most ``limit`` (0: all), a multiple
    of ``multiple`` (a static batch), preprocessed by the model's own transform."""
    recipe = dict(recipe or {})
    if spec == "digits":
        from clustervig.data import digits_split

        remap = _require_classes(spec, cfg, [str(i) for i in range(10)])
        seed, test_size = int(recipe.get("split_seed", 0)), float(recipe.get("test_size", 0.2))
        _, test = digits_split(cfg.img_size, cfg.mean, cfg.std, test_size, seed)
        labels = np.asarray(remap)[test.labels.numpy()]
        pick = _chosen(labels, limit, multiple)
        return LabelledSet(spec, f"{BUILTIN_SETS[spec]}; split seed {seed}, test size {test_size:g}",
                           test.images[torch.from_numpy(pick)], labels[pick], len(labels))
    if spec == "photo-patches":
        from clustervig.photo_data import SOURCES, photo_patches_part

        remap = _require_classes(spec, cfg, list(SOURCES))
        seed, per_class = int(recipe.get("data_seed", 0)), int(recipe.get("test_per_class", 16))
        labels_all = np.repeat(np.arange(len(SOURCES)), per_class)
        pick = _chosen(labels_all, limit, multiple)
        test = photo_patches_part(1, per_class, cfg.img_size, seed, cfg.mean, cfg.std)
        labels = np.asarray(remap)[test.labels.numpy()]
        return LabelledSet(spec, f"held-out crops of clustervig.photo_data; seed {seed}, {per_class} per class",
                           test.images[torch.from_numpy(pick)], labels[pick], len(labels))
    try:
        files, labels = labelled_files(Path(spec), _class_names(cfg), cfg.num_classes)
    except CalibrationDataError as exc:
        raise ValidateSetError(f"--validate-set {spec}: {exc}") from None
    pick = _chosen(labels, limit, multiple)
    chosen = [files[i] for i in pick]
    try:
        images = torch.cat([load_batch(chosen[i : i + 64], transform_spec(cfg)) for i in range(0, len(chosen), 64)])
    except ImageError as exc:
        raise ValidateSetError(f"--validate-set {spec}: image unusable: {exc}") from None
    return LabelledSet(FOLDER_SET, f"folder {Path(spec).resolve()}", images, labels[pick], len(labels))
