"""``cvig dataset``: write a split of the built-in data sets as an image folder ``OUT/<class name>/<i>.png``.

The folders are what a user's own data looks like, so the commands that read
folders take them: ``cvig export --calib-dir`` (training images),
``cvig export --validate-set DIR`` and ``cvig accuracy --folder`` (held-out
images). The splits are drawn exactly as the training recipes draw them
(seed, split sizes), so a ``test`` folder holds the images the trained
checkpoints in ``clustervig/weights/`` never saw.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import List

import click

from .cliutil import CTX, check_output_dir

SETS = ("digits", "photo-patches")


def class_counts(name: str, split: str, seed: int = 0) -> List[int]:
    """Images per class in ``split`` of data set ``name`` (photo-patches: the recipe's count for every class,
    without making the crops)."""
    from .data import digits_split
    from .registry import get_config
    from .train import PhotoRecipe, Recipe

    part = 0 if split == "train" else 1
    if name == "digits":
        cfg, r = get_config("cvig_digits"), Recipe()
        labels = digits_split(cfg.img_size, cfg.mean, cfg.std, r.test_size, seed)[part].labels
        return [int((labels == c).sum()) for c in range(cfg.num_classes)]
    if name == "photo-patches":
        r = PhotoRecipe()
        return [(r.train_per_class, r.test_per_class)[part]] * get_config("cvig_photos").num_classes
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(SETS)}")


def check_per_class(name: str, split: str, per_class: int, seed: int = 0) -> None:
    """``per_class`` must not exceed the smallest class of the split (it would silently write fewer)."""
    counts = class_counts(name, split, seed)
    if per_class and per_class > min(counts):
        have = (f"{counts[0]} images per class" if min(counts) == max(counts)
                else f"{min(counts)} to {max(counts)} images per class")
        raise ValueError(f"--per-class {per_class} is more than the {split} split of {name} holds ({have}, "
                         f"{sum(counts)} in all); give {min(counts)} or less, or 0 for every image of every class")


def write_split(name: str, split: str, out: Path, per_class: int = 0, seed: int = 0) -> int:
    """Write ``split`` ("train" or "test") of data set ``name``; the first ``per_class`` images of each class
    (0: all; more than the smallest class holds is a ValueError). Returns the number of files written. The
    folder appears whole or not at all."""
    from .data import digits_split, write_image_folder
    from .registry import get_config
    from .train import PhotoRecipe, Recipe

    check_per_class(name, split, per_class, seed)
    part = 0 if split == "train" else 1
    if name == "digits":
        cfg, r = get_config("cvig_digits"), Recipe()
        data = digits_split(cfg.img_size, cfg.mean, cfg.std, r.test_size, seed)[part]
    elif name == "photo-patches":
        from .photo_data import photo_patches_part

        cfg, r = get_config("cvig_photos"), PhotoRecipe()
        data = photo_patches_part(part, (r.train_per_class, r.test_per_class)[part], cfg.img_size, seed, cfg.mean, cfg.std)
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(SETS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_image_folder(data, stage, per_class, names=list(cfg.class_names))
        count = sum(1 for _ in stage.rglob("*.png"))
        os.replace(stage, out)  # an empty folder at OUT is replaced; anything else was refused before
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return count


@click.command(context_settings=CTX, epilog="""
\b
Examples:
  cvig dataset photo-patches --split train --per-class 4 -o calib/     # 64 crops for --calib-dir
  cvig dataset photo-patches --split test -o heldout/                  # the 256 held-out crops
  cvig export --checkpoint clustervig/weights/cvig_photos.pth --fp16 --int8 --calib-dir calib/ \\
      --validate-set heldout/ -o out/
  cvig dataset digits --split test -o digits-test/ && cvig accuracy out/*.onnx --folder digits-test/
""")
@click.argument("name", type=click.Choice(SETS))
@click.option("--split", type=click.Choice(["train", "test"]), required=True,
              help="train: the images the recipe trains on (for calibration); test: the held-out images.")
@click.option("--per-class", type=click.IntRange(min=0), default=0, show_default=True,
              help="Write the first N images of each class (0: all: digits 1,437 train / 360 test, 35 to 37 per "
                   "class in test; photo-patches 64 / 16 per class). More than the smallest class holds is refused.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Split seed (the recipes' default 0 draws the splits of the committed checkpoints).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), required=True,
              help="Folder to create (it must not exist, or be empty).")
def command(name, split, per_class, seed, out):
    """Write a split of the digits or photo-patches data set as PNG files OUT/<class name>/<i>.png, drawn as
    the training recipes draw it."""
    check_output_dir(out, "-o/--output")
    if out.exists() and any(out.iterdir()):
        raise click.BadParameter(f"{out} exists and is not empty; give a new folder", param_hint="-o/--output")
    try:
        check_per_class(name, split, per_class, seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("--per-class "), param_hint="--per-class") from None
    n = write_split(name, split, out, per_class, seed)
    click.echo(f"wrote {n} images of the {split} split of {name} to {out}/", err=True)
