"""Image classification on a Session: files -> preprocessed batches -> top-k with class names."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from clustervig.preprocess import ImageError, load_image, preprocess_pil

from .session import Session


def imagenet1k_names() -> List[str]:
    """The 1,000 ILSVRC-2012 class names in the standard index order (0 = tench ... 999 = toilet tissue)."""
    from importlib import resources

    text = resources.files("clustervig").joinpath("labels/imagenet1k.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    assert len(names) == 1000, f"clustervig/labels/imagenet1k.txt has {len(names)} names, expected 1000"
    return names


def class_names(session: Session, labels_file: Optional[Path] = None) -> List[str]:
    """Names from ``labels_file`` (one per line), else the recorded ones, else the ImageNet-1k names for a
    1000-class model, else ``class_<i>``."""
    n = int(session.config.get("num_classes", 0))
    if labels_file is not None:
        names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        if n and len(names) != n:
            raise ValueError(f"{labels_file} has {len(names)} names but the model has {n} classes")
        return names
    recorded = session.config.get("class_names")
    if recorded:
        return list(recorded)
    if n == 1000:
        return imagenet1k_names()
    return [f"class_{i}" for i in range(n)]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def image_batches(session: Session, files: Sequence[Path], batch: int,
                  on_error: Optional[Callable[[Path, ImageError], None]] = None,
                  progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[List[Path], np.ndarray]]:
    """``(paths, inputs)`` per batch of up to ``batch`` readable files, each preprocessed as the session's model
    records (RGB in [0, 1] for a graph that normalises itself); an unreadable file goes to ``on_error`` (or
    raises its :class:`~clustervig.preprocess.ImageError` when that is ``None``); ``progress`` gets the number
    of files handled after each batch."""
    spec = session.preprocess
    pending: List[Path] = []
    images: List[np.ndarray] = []
    handled = 0

    def inputs() -> np.ndarray:
        x = np.stack(images)
        if spec.get("normalize_in_graph"):  # the graph normalises: feed RGB in [0, 1]
            mean = np.asarray(spec["mean"], np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(spec["std"], np.float32).reshape(1, 3, 1, 1)
            x = x * std + mean
        return x

    for f in files:
        try:
            images.append(preprocess_pil(load_image(f), spec).numpy())
            pending.append(f)  # as given: results name the files the way the caller did
        except ImageError as exc:
            if on_error is None:
                raise
            on_error(Path(f), exc)
        handled += 1
        if len(images) == batch:
            yield list(pending), inputs()
            pending.clear()
            images.clear()
            if progress is not None:
                progress(handled)
    if images:
        yield list(pending), inputs()
    if progress is not None:
        progress(handled)


def classify_files(session: Session, files: Sequence[Path], batch: int = 8, topk: int = 5,
                   names: Optional[List[str]] = None,
                   on_error: Optional[Callable[[Path, ImageError], None]] = None,
                   progress: Optional[Callable[[int], None]] = None) -> List[Dict]:
    """Classify image files with ``session``, preprocessed as the session's model records.

    Args:
        session: an open :class:`Session` (``open_session``): ONNX Runtime or TensorRT.
        files: PNG or JPEG files (README, "Accepted images"), classified in this order.
        batch: images per inference call (a static-batch model is fed in chunks of its own batch).
        topk: classes listed per image, highest logit first.
        names: class names (default :func:`class_names`: recorded at export, ImageNet-1k names for a 1000-class
            model, else ``class_<i>``).
        on_error: called as ``on_error(path, error)`` for a file that cannot be read (missing, corrupt, not
            PNG/JPEG), which is then left out and the others classified; ``None`` (default) raises the
            :class:`~clustervig.preprocess.ImageError` of the first such file.
        progress: called with the number of files handled (classified or left out) after each batch.

    Returns:
        One dict per classified file, in order: ``{"file", "top": [{"class", "name", "probability", "logit"}],
        "logits"}`` (probabilities are the softmax of the logits).

    Example::

        with open_session("out/model_fp32.onnx") as s:
            best = classify_files(s, ["photo.jpg"], topk=1)[0]["top"][0]   # {"class": 281, "name": "tabby", ...}
    """
    names = names or class_names(session)
    results: List[Dict] = []
    for paths, x in image_batches(session, files, batch, on_error, progress):
        logits = session.infer(x)
        probs = softmax(logits.astype(np.float64))
        for f, lg, pr in zip(paths, logits, probs):
            order = np.argsort(-lg, kind="stable")[:topk]
            results.append({
                "file": str(f),
                "top": [{"class": int(c), "name": names[c] if c < len(names) else str(c),
                         "probability": float(pr[c]), "logit": float(lg[c])} for c in order],
                "logits": lg.tolist(),
            })
    return results
