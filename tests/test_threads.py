"""Thread caps: OMP_NUM_THREADS (read by torch itself) also caps every ONNX Runtime session the tools open, whose
threads then sleep instead of spinning; an explicit thread count wins; no cap keeps ONNX Runtime's defaults."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from clustervig.utils import ort_session_options, thread_cap


@pytest.mark.parametrize("value,cap", [("3", 3), (" 2 ", 2), ("", 0), ("abc", 0), ("-4", 0), ("0", 0)])
def test_cap_read_from_omp_num_threads(monkeypatch, value, cap):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert thread_cap() == cap
    opts = ort_session_options()
    assert opts.intra_op_num_threads == cap
    if cap:
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.inter_op_num_threads == 1


def test_unset_and_explicit(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_cap() == 0 and ort_session_options().intra_op_num_threads == 0  # ONNX Runtime's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    opts = ort_session_options(threads=2)
    assert opts.intra_op_num_threads == 2


def test_a_capped_session_computes_the_same(monkeypatch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    w = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                          [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    a = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = ort.InferenceSession(model, ort_session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": a})[0]
    np.testing.assert_allclose(out, a @ w, rtol=1e-5, atol=1e-5)
