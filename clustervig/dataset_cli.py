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

import click

from .cliutil import CTX, check_output_dir

SETS = ("digits", "photo-patches")


def write_split(name: str, split: str, out: Path, per_class: int = 0, seed: int = 0) -> int:
    """Write ``split`` ("train" or "test") of data set ``name``; the first ``per_class`` images of each class
    (0: all). Returns the number of files written. The folder appears whole or not at all."""
    from .data import digits_split, write_image_folder
    from .registry import get_config
    from .train import PhotoRecipe, Recipe

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
              help="Write the first N images of each class (0: all: digits 1,437 train / 360 test, "
                   "photo-patches 64 / 16 per class).")
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
    n = write_split(name, split, out, per_class, seed)
    click.echo(f"wrote {n} images of the {split} split of {name} to {out}/", err=True)
