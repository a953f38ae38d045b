"""INT8 through NVIDIA ModelOpt's ONNX post-training quantization (``cvig export --int8-backend modelopt``).

ModelOpt (``pip install "nvidia-modelopt[onnx]"``) pins onnx / onnxruntime
versions that conflict with this package's, so it is not a dependency. It is
used where it is importable, or from another interpreter that has it:
``CVIG_MODELOPT_PYTHON=/path/venv/bin/python`` (this file runs there as a
script and needs only numpy and modelopt).

The call: ``modelopt.onnx.quantization.quantize`` in ``int8`` mode on a copy of
the FP32 graph (ModelOpt rewrites its input file in place), calibration on the
CPU provider, ``high_precision_dtype="fp32"`` (its FP16 default converts the
rest of the graph to FP16: 81 % top-1 on the digits model), quantized op types
Conv and Add (ModelOpt places the Add's Q/DQ for fusion itself), and every node
inside a DEGC's normalisation, k-means, k-NN, centroid and GATv2 scopes
excluded, as in this package's own placement (docs/design.md, "INT8
placement"). Methods: ``max`` and ``entropy`` (ModelOpt has no percentile).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

ENV = "CVIG_MODELOPT_PYTHON"
METHODS = ("max", "entropy")
EXCLUDE = [r".*degc/(norm|kmeans|knn|centroids|gat)/.*"]
OP_TYPES = ["Conv", "Add"]
INSTALL = ('pip install "nvidia-modelopt[onnx]" in a separate virtual environment (its onnx/onnxruntime pins '
           f"conflict with this package's) and point {ENV} at that environment's python")


class ModelOptUnavailable(RuntimeError):
    """ModelOpt cannot be used here; the message says how to make it available."""


def where() -> str:
    """``"here"`` when modelopt imports in this interpreter, else the interpreter named by
    ``$CVIG_MODELOPT_PYTHON``; raises :class:`ModelOptUnavailable` with the fix otherwise."""
    if importlib.util.find_spec("modelopt") is not None and importlib.util.find_spec("modelopt.onnx") is not None:
        return "here"
    py = os.environ.get(ENV)
    if not py:
        raise ModelOptUnavailable(f"NVIDIA ModelOpt is not installed: {INSTALL}")
    if not Path(py).is_file():
        raise ModelOptUnavailable(f"{ENV}={py} does not exist: {INSTALL}")
    res = subprocess.run([py, "-c", "import modelopt.onnx.quantization"], capture_output=True, text=True)
    if res.returncode != 0:
        raise ModelOptUnavailable(f"{ENV}={py} cannot import modelopt.onnx.quantization "
                                  f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no message'}): "
                                  f"{INSTALL}")
    return py


def _quantize_here(fp32: Path, calib: np.ndarray, method: str, out: Path, input_name: str) -> None:
    from modelopt.onnx.quantization import quantize

    with tempfile.TemporaryDirectory(prefix="cvig-modelopt-") as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copyfile(fp32, src)  # quantize() runs shape inference on its input file in place
        quantize(onnx_path=str(src), quantize_mode="int8", calibration_data={input_name: calib},
                 calibration_method=method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                 op_types_to_quantize=OP_TYPES, nodes_to_exclude=EXCLUDE, output_path=str(out), log_level="ERROR")


def quantize_modelopt(fp32: Path, calib: np.ndarray, method: str, out: Path, input_name: str = "images",
                      timeout: float = 1800) -> None:
    """Write ``out``: ``fp32`` quantized by ModelOpt with ``method`` on the preprocessed images ``calib``."""
    if method not in METHODS:
        raise ValueError(f"ModelOpt calibrates with {' or '.join(METHODS)}, not {method!r} (--calib-method)")
    how = where()
    calib = np.ascontiguousarray(calib, np.float32)
    if how == "here":
        _quantize_here(Path(fp32), calib, method, Path(out), input_name)
    else:
        with tempfile.TemporaryDirectory(prefix="cvig-modelopt-") as tmp:
            np.save(Path(tmp) / "calib.npy", calib)
            cmd = [how, str(Path(__file__).resolve()), str(fp32), str(Path(tmp) / "calib.npy"), method, str(out),
                   "--input", input_name]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"ModelOpt ({how}) took more than {timeout:.0f} s") from None
            if res.returncode != 0:
                tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"ModelOpt ({how}) failed (exit {res.returncode}):\n{tail}")
    if not Path(out).is_file():
        raise RuntimeError(f"ModelOpt wrote no {out}")


def _main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description="Quantize an FP32 ONNX graph with ModelOpt (run by clustervig).")
    ap.add_argument("fp32")
    ap.add_argument("calib", help=".npy of preprocessed calibration images")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("out")
    ap.add_argument("--input", default="images")
    a = ap.parse_args(argv)
    _quantize_here(Path(a.fp32), np.load(a.calib), a.method, Path(a.out), a.input)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
