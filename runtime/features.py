"""Feature maps of a backbone export (``cvig export --features``) on a Session: files -> preprocessed batches ->
named maps ``[C, h, w]`` per image."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from clustervig.preprocess import ImageError

from .classify import image_batches
from .session import RuntimeErrorWithFix, Session


def extract_features(session: Session, files: Sequence[Path], batch: int = 8,
                     on_error: Optional[Callable[[Path, ImageError], None]] = None,
                     progress: Optional[Callable[[int], None]] = None) -> List[Dict]:
    """Run a backbone artifact on image files, preprocessed as the session's model records.

    Args:
        session: an open :class:`Session` of a ``--features`` export (``session.is_backbone``).
        files: PNG or JPEG files, in this order.
        batch: images per inference call (a static-batch model is fed in chunks of its own batch).
        on_error: called as ``on_error(path, error)`` for a file that cannot be read, which is then left out;
            ``None`` (default) raises the :class:`~clustervig.preprocess.ImageError` of the first such file.
        progress: called with the number of files handled after each batch.

    Returns:
        One dict per file that was read, in order: ``{"file", "maps": {name: float32 [C, h, w]}}``, the maps in
        ``session.output_names`` order.

    Raises:
        RuntimeErrorWithFix: the session is a classifier (use ``classify_files``).
    """
    if not session.is_backbone:
        raise RuntimeErrorWithFix(f"{session.path} is a classifier (its output is logits), not a --features export: "
                                  "classify with classify_files / cvig run")
    results: List[Dict] = []
    for paths, x in image_batches(session, files, batch, on_error, progress):
        maps = session.infer(x)
        for i, f in enumerate(paths):
            results.append({"file": str(f), "maps": {name: m[i] for name, m in maps.items()}})
    return results


def summarize(result: Dict) -> Dict:
    """One image's maps in numbers small enough to print or write as JSON: shape, mean, std and max |x| each."""
    return {"file": result["file"],
            "maps": {name: {"shape": list(m.shape), "mean": float(m.mean()), "std": float(m.std()),
                            "max_abs": float(np.abs(m).max())} for name, m in result["maps"].items()}}


def save_npz(path: Path, results: List[Dict]) -> None:
    """The maps of every image in one NumPy ``.npz``: ``<name>`` ``[images, C, h, w]`` per map and ``files``
    (the image paths, in the same order), written whole or not at all."""
    from clustervig.utils import atomic_path

    arrays = {name: np.stack([r["maps"][name] for r in results]) for name in results[0]["maps"]} if results else {}
    arrays["files"] = np.asarray([r["file"] for r in results])
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
