"""Reproducible training of ClusterViG on scikit-learn's digits (CPU, minutes).

    cvig-train-digits                       # recipe defaults, writes ./cvig_digits-<UTC time>.pth
    cvig-train-digits --epochs 5 -o /tmp/d.pth

The recipe (model, seed, optimiser, schedule, augmentation, split) is stored
in the checkpoint next to the weights and the measured metrics, so the file
documents itself. Determinism: one seed drives initialisation, shuffling and
augmentation; CPU kernels used here are deterministic.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import save_checkpoint
from .data import digits_split
from .model import ClusterViG
from .registry import create_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class Recipe:
    model: str = "cvig_digits"
    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    max_shift: int = 3  # random translation in pixels of the 32x32 image
    seed: int = 0
    split_seed: int = 0
    test_size: float = 0.2


def random_shift(x: Tensor, max_shift: int, background: float, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=background)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


@torch.no_grad()
def evaluate(model: ClusterViG, images: Tensor, labels: Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
    return correct / len(images)


def fit(model: ClusterViG, recipe, train, test, augment, log=print, eval_batch: int = 256, progress: bool = False):
    """AdamW with linear warm-up and a cosine schedule over ``recipe.epochs``, cross-entropy with label
    smoothing on both heads; ``augment(x, gen)`` transforms each batch (``gen``: seeded by ``recipe.seed``,
    also shuffling). ``progress``: each epoch's steps on stderr (:class:`clustervig.cliutil.Progress`).
    Returns the per-epoch history and the ``time.perf_counter()`` of the start."""
    from .cliutil import Progress

    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train.images) / recipe.batch)
    total = recipe.epochs * steps_per_epoch
    warm = recipe.warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return recipe.lr * (step + 1) / warm
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    t0 = time.perf_counter()
    step = 0
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(train.images), generator=gen)
        loss_sum = 0.0
        bar = Progress(f"epoch {epoch + 1}/{recipe.epochs}", steps_per_epoch, unit="steps", enabled=progress,
                       transient=True, min_interval_s=15)
        for i in range(0, len(perm), recipe.batch):
            ii = perm[i : i + recipe.batch]
            x = augment(train.images[ii], gen)
            y = train.labels[ii]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            cls, dist = model(x)
            loss = F.cross_entropy(cls, y, label_smoothing=recipe.label_smoothing) + F.cross_entropy(
                dist, y, label_smoothing=recipe.label_smoothing
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(ii)
            step += 1
            bar.update(1, note=f"loss {loss.item():.4f}")
        bar.close()
        acc = evaluate(model, test.images, test.labels, batch=eval_batch)
        history.append({"epoch": epoch + 1, "loss": loss_sum / len(perm), "test_top1": acc})
        log(f"epoch {epoch + 1:>3}/{recipe.epochs}  loss {loss_sum / len(perm):.4f}  test top-1 {acc * 100:.2f}%  "
            f"[{time.perf_counter() - t0:.0f}s]")
    return history, t0


def train_digits(recipe: Recipe, out: Optional[Path] = None, log=print, progress: bool = False) -> Dict:
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model)
    cfg = model.cfg
    train, test = digits_split(cfg.img_size, cfg.mean, cfg.std, recipe.test_size, recipe.split_seed)
    background = (0.0 - cfg.mean[0]) / cfg.std[0]
    history, t0 = fit(model, recipe, train, test,
                      lambda x, gen: random_shift(x, recipe.max_shift, background, gen), log, progress=progress)
    return _finish(model, recipe, history, t0, train, test, out, log,
                   train_top1=evaluate(model, train.images, train.labels))


def _finish(model: ClusterViG, recipe, history, t0: float, train, test, out: Optional[Path], log, **extra) -> Dict:
    """Metrics of a finished training (``extra`` after the test top-1), the checkpoint with its recipe."""
    metrics = {
        "test_top1": history[-1]["test_top1"],
        **extra,
        "train_seconds": time.perf_counter() - t0,
        "train_images": len(train.images),
        "test_images": len(test.images),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
    }
    if out is not None:
        save_checkpoint(model.eval(), out, recipe=asdict(recipe), metrics=metrics, history=history)
        log(f"wrote {out}")
    return {"model": model, "metrics": metrics, "history": history}


@dataclass
class PhotoRecipe:
    model: str = "cvig_photos"
    epochs: int = 14
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    train_per_class: int = 64
    test_per_class: int = 16
    seed: int = 0
    data_seed: int = 0


def train_photos(recipe: PhotoRecipe, out: Optional[Path] = None, log=print, progress: bool = False) -> Dict:
    """The 224-px model on the photo-patches data set (clustervig.photo_data): AdamW, cosine schedule,
    random mirroring on top of the data set's own crops and colour jitter."""
    from .photo_data import photo_patches_split

    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model)
    cfg = model.cfg
    train, test = photo_patches_split(recipe.train_per_class, recipe.test_per_class, cfg.img_size, recipe.data_seed,
                                      cfg.mean, cfg.std)

    def mirror(x, gen):
        flip = torch.rand(len(x), generator=gen) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    history, t0 = fit(model, recipe, train, test, mirror, log, eval_batch=64, progress=progress)
    return _finish(model, recipe, history, t0, train, test, out, log)


def _train_command(name: str, recipe_cls, train, what: str, seed_help: str, doc: str, epilog: str):
    """``cvig <name>``: a recipe's epochs, batch, lr and seed as options; the checkpoint is -o (never
    overwritten without --force); prints the held-out top-1 at the end."""
    import click

    from .cliutil import CTX, check_output_file

    d = recipe_cls()

    @click.command(name, context_settings=CTX, epilog=epilog, help=doc)
    @click.option("--epochs", type=click.IntRange(min=1), default=d.epochs, help="Training epochs.")
    @click.option("--batch", type=click.IntRange(min=1), default=d.batch, help="Images per step.")
    @click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=d.lr, help="Peak learning rate (AdamW).")
    @click.option("--seed", type=int, default=d.seed, help=seed_help)
    @click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                  help=f"Checkpoint to write (default: a new file {d.model}-<UTC time>.pth in the current folder).")
    @click.option("--force", is_flag=True, help="Overwrite an existing -o file.")
    def command(epochs, batch, lr, seed, output, force):
        if output is None:
            output = Path(f"{d.model}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.pth")
        check_output_file(output, "-o/--output")  # before minutes of training
        if output.exists() and not force:
            raise click.BadParameter(f"{output} exists; pass --force to overwrite it or choose another path",
                                     param_hint="-o/--output")
        res = train(recipe_cls(epochs=epochs, batch=batch, lr=lr, seed=seed), output, log=click.echo, progress=True)
        m = res["metrics"]
        click.echo(f"test top-1 {m['test_top1'] * 100:.2f}% on {m['test_images']} {what}, {m['train_seconds']:.0f}s")

    return command


photos_command = _train_command(
    "train-photos", PhotoRecipe, train_photos, "held-out crops", "Seed of initialisation, shuffling and mirroring.",
    "Train the 224-px cvig_photos model (12 blocks, 14x14 tokens) on the photo-patches data set (16 scikit-image "
    "sources, 64 training crops each, CPU); the recipe and the measured accuracy are stored in the checkpoint.",
    """
\b
Examples:
  cvig train-photos                          # writes ./cvig_photos-<UTC time>.pth (about 30 min on 2 cores)
  cvig train-photos --epochs 2 -o /tmp/p.pth
  cvig export --checkpoint /tmp/p.pth --fp16 -o out/

\b
The data set (clustervig.photo_data) is made from scikit-image's own
images, deterministically; nothing is downloaded.
""")


command = _train_command(
    "train-digits", Recipe, train_digits, "held-out digits", "Seed of initialisation, shuffling and augmentation.",
    "Train ClusterViG on scikit-learn's digits (1,437 training scans, CPU, minutes); the recipe and the measured "
    "accuracy are stored in the checkpoint.",
    """
\b
Examples:
  cvig-train-digits                          # writes ./cvig_digits-<UTC time>.pth
  cvig-train-digits --epochs 5 -o /tmp/d.pth
  cvig-export --checkpoint /tmp/d.pth --fp16 -o out/

\b
The shipped clustervig/weights/cvig_digits.pth is never overwritten unless
given explicitly as -o.
""")


def main(argv=None) -> int:
    """cvig-train-digits (also ``cvig train-digits``)."""
    return command.main(args=argv, prog_name="cvig-train-digits")


if __name__ == "__main__":
    sys.exit(main())
