"""Where ``cvig build-plugins`` put the libraries it built on this machine, so that every command finds them
without flags: ``cvig export``, ``cvig run``, ``cvig compare`` and :func:`clustervig.runtime.open_session`
take the TensorRT plugin library from here, :func:`clustervig.plugins.kernels.find_library` the CUDA kernels.

The record is one JSON file, ``$CVIG_HOME/libraries.json`` (``CVIG_HOME`` defaults to
``$XDG_DATA_HOME/clustervig``, i.e. ``~/.local/share/clustervig``). Standard library only.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Optional

ENV_HOME = "CVIG_HOME"
ENV_PLUGINS = "CVIG_PLUGINS_LIB"  # the TensorRT plugin library, overriding the record
KINDS = {  # recorded name -> file
    "kernels": "libcvig_kernels.so",
    "plugins": "libcvig_plugins.so",
    "plugins_autoreg": "libcvig_plugins_autoreg.so",
}


def home() -> Path:
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "clustervig"


def record_file() -> Path:
    return home() / "libraries.json"


def read() -> Dict:
    """The record ({} when there is none or it cannot be read)."""
    try:
        data = json.loads(record_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(libraries: Dict[str, str], details: Optional[Dict] = None) -> Path:
    """Replace the record with these libraries (kind -> path) and what they were built with; atomic."""
    unknown = set(libraries) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown library kinds {sorted(unknown)} (known: {sorted(KINDS)})")
    path = record_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"libraries": {k: str(Path(v).resolve()) for k, v in libraries.items()}, **(details or {})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".libraries-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def recorded(kind: str) -> Optional[Path]:
    """The recorded library of this kind, if the file is still there."""
    if kind not in KINDS:
        raise ValueError(f"unknown library kind {kind!r} (known: {sorted(KINDS)})")
    p = (read().get("libraries") or {}).get(kind)
    return Path(p) if p and Path(p).is_file() else None


def plugin_library(explicit: Optional[os.PathLike] = None) -> Optional[Path]:
    """The TensorRT plugin library to use: ``explicit``, else ``$CVIG_PLUGINS_LIB``, else the recorded one,
    else a checkout's ``build/plugins/libcvig_plugins.so``; None when there is none."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_PLUGINS):
        return Path(os.environ[ENV_PLUGINS])
    found = recorded("plugins")
    if found is not None:
        return found
    here = Path(__file__).resolve().parent
    if not (here / "common").is_dir():  # a checkout: plugins/python/ -> the repository root
        checkout = here.parents[1] / "build" / "plugins" / KINDS["plugins"]
        if checkout.is_file():
            return checkout
    return None
