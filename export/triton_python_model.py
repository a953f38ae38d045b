"""Triton Python-backend model serving an exported ClusterViG ONNX graph with ONNX Runtime.

``cvig export --triton-repo DIR --triton-backend python`` copies this file as
``<model>/1/model.py`` beside ``model.onnx``. Triton calls ``execute`` with the
requests its dynamic batcher gathered; they run as one ONNX Runtime batch
(where the graph has a dynamic batch) and each request gets its own rows back.

The server's Python environment needs numpy (< 2 for tritonserver 2.51's
Python backend) and onnxruntime. A plugin graph (``model_plugins.onnx``, the
ClusterViG plugin nodes) also needs this package and onnxruntime-extensions
there: its plugin nodes run on the host build of the plugin kernels.
"""
from __future__ import annotations

import json
import os
from typing import List, Sequence

import numpy as np

try:  # provided by the Triton Python backend; absent when this file is imported elsewhere (tests)
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - replaced by the tests' stand-in
    pb_utils = None

INPUT, OUTPUT = "images", "logits"
PLUGIN_DOMAIN = "cvig"


def open_session(path: str, threads: int = 0):
    """An ONNX Runtime CPU session for ``path``; plugin graphs get the ClusterViG host-kernel ops."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime names the unknown op: "cvig:CvigKMeans(-1) is not a registered ..."
        if f"{PLUGIN_DOMAIN}:Cvig" not in str(exc):
            raise
    try:
        import onnx

        from clustervig.export.plugin_graph import ort_session
    except ImportError as exc:
        raise RuntimeError(
            f"{path} is a ClusterViG plugin graph: install clustervig-trt and onnxruntime-extensions in the "
            f"server's Python environment to serve it with the Python backend ({exc})") from None
    return ort_session(onnx.load(path))


def split_rows(logits: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    """The rows of one batched output that belong to each request, in order."""
    if logits.shape[0] != sum(sizes):
        raise RuntimeError(f"the model returned {logits.shape[0]} rows for {sum(sizes)} images")
    bounds = np.cumsum([0, *sizes])
    return [logits[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.path = os.path.join(folder, "model.onnx")
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0") or 0)
        self.session = open_session(self.path, threads)
        # max_batch_size 0: the graph has a fixed batch and each request carries all of it
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.input_dtype = self.session.get_inputs()[0].type  # 'tensor(float)' or 'tensor(float16)'

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        try:
            if self.batching and len(arrays) > 1:
                logits = self.session.run([OUTPUT], {INPUT: np.concatenate(arrays)})[0]
                parts = split_rows(logits, [a.shape[0] for a in arrays])
            else:
                parts = [self.session.run([OUTPUT], {INPUT: a})[0] for a in arrays]
        except Exception as exc:  # an error for each request; the model stays loaded
            err = pb_utils.TritonError(f"ONNX Runtime failed on {self.path}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, np.ascontiguousarray(p))])
                for p in parts]

    def finalize(self):
        self.session = None
