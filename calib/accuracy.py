"""cvig-accuracy: top-1 of several artifacts on labelled images, side by side with their agreement.

Inputs: the held-out split of scikit-learn's digits (``--digits``) or a folder
``DIR/<class index or name>/<image>``. The reference for agreement and cosine
is the first model given (PyTorch when ``--checkpoint`` is given).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click
import numpy as np

from clustervig.cliutil import CTX, MODEL_NAME, check_output_file, model_help, write_json


def labelled_folder(folder: Path, spec: Dict, names: List[str], num_classes: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    from clustervig.preprocess import load_batch

    from .data import labelled_files

    files, labels = labelled_files(folder, names, num_classes)
    return load_batch(files, spec).numpy(), labels


def evaluate(logits: Dict[str, np.ndarray], labels: np.ndarray) -> List[Dict]:
    names = list(logits)
    ref = logits[names[0]].astype(np.float64)
    rows = []
    for n in names:
        lg = logits[n].astype(np.float64)
        cos = (lg * ref).sum(1) / np.maximum(np.linalg.norm(lg, axis=1) * np.linalg.norm(ref, axis=1), 1e-30)
        rows.append({"model": n, "top1": float((lg.argmax(1) == labels).mean()),
                     "agreement_with_reference": float((lg.argmax(1) == ref.argmax(1)).mean()),
                     "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "images": int(len(labels))})
    return rows


def table(rows: List[Dict]) -> str:
    w = max([28] + [len(r["model"]) + 1 for r in rows])
    lines = [f"{'model':<{w}} {'top-1':>7} {'agree':>7} {'cos mean':>9} {'cos min':>8}"]
    for r in rows:
        lines.append(f"{r['model']:<{w}} {r['top1'] * 100:>6.2f}% {r['agreement_with_reference'] * 100:>6.2f}% "
                     f"{r['cosine_mean']:>9.5f} {r['cosine_min']:>8.5f}")
    return "\n".join(lines)


def row_names(models: List[Path]) -> List[str]:
    """Row names: the file name, or the path as given where two models share a file name (numbered when the
    same path is given twice)."""
    names = [m.name if sum(o.name == m.name for o in models) == 1 else str(m) for m in models]
    return [n if names.count(n) == 1 else f"{n} #{names[:i + 1].count(n)}" for i, n in enumerate(names)]


def run(models: List[Path], checkpoint: Optional[Path], digits: bool, folder: Optional[Path],
        model_name: Optional[str] = None, progress: bool = False, chunk: int = 32) -> Tuple[List[Dict], Dict]:
    """Top-1 of each model (PyTorch first with ``checkpoint``) on the labelled images, with agreement and logit
    cosine against the first; ``progress`` shows the image runs on stderr (:class:`clustervig.cliutil.Progress`)."""
    import torch

    from clustervig.cliutil import Progress

    from clustervig.checkpoint import build_model
    from clustervig.preprocess import transform_spec
    from clustervig.runtime import open_session

    sessions = [open_session(m) for m in models]
    spec = sessions[0].preprocess if sessions else None
    cfg = sessions[0].config if sessions else None
    model = None
    if checkpoint is not None:
        model = build_model(model_name, checkpoint).eval()
        spec = spec or transform_spec(model.cfg)
        cfg = cfg or model.cfg.to_dict()
    classes = {int(c) for c in [cfg.get("num_classes")] + [s.config.get("num_classes") for s in sessions] if c}
    if model is not None:
        classes.add(model.cfg.num_classes)
    if digits and classes != {10}:
        raise click.ClickException(f"--digits scores 10 digit classes, and the models have {sorted(classes)} classes: "
                                   "use --folder DIR/<class>/<image> with labelled images of the model's classes")
    if len(classes) > 1:
        raise click.ClickException(f"the models have different class counts {sorted(classes)}: compare one model's artifacts")
    if digits:
        from clustervig.data import digits_split

        _, test = digits_split(int(spec["img_size"]), spec["mean"], spec["std"])
        x, y = test.images.numpy(), test.labels.numpy()
    else:
        x, y = labelled_folder(folder, spec, list(cfg.get("class_names") or []), next(iter(classes), None))
    runners = []  # (name, function of a chunk of images -> logits)
    if model is not None:
        def torch_infer(xb: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(xb)).numpy()
        runners.append(("pytorch", torch_infer))
    runners += list(zip(row_names(models), (s.infer for s in sessions)))
    logits: Dict[str, np.ndarray] = {}
    what = f"{len(x)} images x {len(runners)} model{'s' if len(runners) > 1 else ''}"
    with Progress(f"cvig accuracy ({what})", len(x) * len(runners), unit="image runs", enabled=progress) as bar:
        for name, infer in runners:
            parts = []
            for i in range(0, len(x), chunk):
                parts.append(np.asarray(infer(x[i : i + chunk]), dtype=np.float32))
                bar.update(len(parts[-1]), note=name)
            logits[name] = np.concatenate(parts)
    return evaluate(logits, y), {"spec": spec}


@click.command(context_settings=CTX, epilog="""
\b
Examples:
  cvig-accuracy out/model_fp32.onnx out/model_fp16.onnx out/model_int8.onnx --digits
  cvig-accuracy out/*.onnx --folder labelled/ --checkpoint ck.pth -o acc.json
""")
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Add the PyTorch model (first, the reference).")
@click.option("--model", "model_name", type=MODEL_NAME, default=None,
              help=model_help("Variant for a --checkpoint that does not record it (a plain state_dict)."))
@click.option("--digits", is_flag=True, help="Use the held-out digits split (360 scans; 10-class models only).")
@click.option("--folder", type=click.Path(path_type=Path), default=None, help="Labelled folder DIR/<class>/<image>.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON to stdout instead of a table (no progress "
              "display).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON to this file.")
def main(models, checkpoint, model_name, digits, folder, as_json, output):
    """Top-1 of MODELS (.onnx / .plan) on labelled images, with their agreement with the first (PyTorch with
    --checkpoint). Inputs: the held-out split of scikit-learn's digits (--digits) or a folder
    DIR/<class index or name>/<image>."""
    if not models and checkpoint is None:
        raise click.UsageError("give ONNX/engine files and/or --checkpoint")
    if digits == (folder is not None):
        raise click.UsageError("choose exactly one of --digits and --folder")
    check_output_file(output, "-o/--output")
    from clustervig.checkpoint import CheckpointError
    from clustervig.registry import UnknownModelError
    from clustervig.runtime.session import RuntimeErrorWithFix

    from .data import CalibrationDataError

    try:
        rows, _ = run(list(models), checkpoint, digits, folder, model_name, progress=not as_json)
    except (CalibrationDataError, CheckpointError, RuntimeErrorWithFix, UnknownModelError) as exc:
        raise click.ClickException(str(exc)) from None
    if output is not None:
        write_json(output, rows)
    click.echo(json.dumps(rows, indent=2) if as_json else table(rows))
