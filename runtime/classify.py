"""Image classification on a Session: files -> preprocessed batches -> top-k with class names."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from clustervig.preprocess import load_batch

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


def classify_files(session: Session, files: Sequence[Path], batch: int = 8, topk: int = 5,
                   names: Optional[List[str]] = None) -> List[Dict]:
    spec = session.preprocess
    names = names or class_names(session)
    results: List[Dict] = []
    for i in range(0, len(files), batch):
        chunk = list(files[i : i + batch])
        x = load_batch(chunk, spec).numpy()
        if spec.get("normalize_in_graph"):  # the graph normalises: feed RGB in [0, 1]
            mean = np.asarray(spec["mean"], np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(spec["std"], np.float32).reshape(1, 3, 1, 1)
            x = x * std + mean
        logits = session.infer(x)
        probs = softmax(logits.astype(np.float64))
        for f, lg, pr in zip(chunk, logits, probs):
            order = np.argsort(-lg, kind="stable")[:topk]
            results.append({
                "file": str(f),
                "top": [{"class": int(c), "name": names[c] if c < len(names) else str(c),
                         "probability": float(pr[c]), "logit": float(lg[c])} for c in order],
                "logits": lg.tolist(),
            })
    return results
