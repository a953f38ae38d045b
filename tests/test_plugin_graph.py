"""Graph surgery to the TensorRT plugin graph, run on a CPU with the reference ops (onnxruntime-extensions)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from clustervig.export.cli import main as export_main
from clustervig.export.onnx_export import BatchSpec, export_onnx
from clustervig.export.plugin_graph import SurgeryError, ort_session, to_plugin_graph

from test_export_onnx import photos_model


_EXPORTS = {}  # (name, seed, simplify) -> (model, photos, graph): cvig_ti takes ~10 s to export on 2 cores


def exported(tmp_path, name, seed=0, simplify=True, **kw):
    """The model, its photographs and its ONNX graph, also saved as tmp_path/<name>.onnx.

    Exports without overrides are made once per test session (tests only read them: a fresh copy of
    the graph each time)."""
    key = (name, seed, simplify)
    if kw or key not in _EXPORTS:
        model, photos = photos_model(name, seed=seed) if not kw else _model(name, seed, **kw)
        export_onnx(model, tmp_path / f"{name}.onnx", BatchSpec(1, 4, 4), simplify=simplify)
        g = onnx.load(str(tmp_path / f"{name}.onnx"))
        if kw:
            return model, photos, g
        _EXPORTS[key] = (model, photos, g)
    model, photos, g = _EXPORTS[key]
    copy = onnx.ModelProto()
    copy.CopyFrom(g)
    onnx.save(copy, str(tmp_path / f"{name}.onnx"))
    return model, photos, copy


def _model(name, seed, **kw):
    import torch

    import clustervig
    from clustervig.preprocess import sample_photographs, transform_spec
    from clustervig.utils import calibrate_batchnorm

    torch.manual_seed(seed)
    m = clustervig.create_model(name, **kw)
    x = sample_photographs(transform_spec(m.cfg))
    calibrate_batchnorm(m, [x])
    return m.eval(), x


def pure_logits(tmp_path, name, x):
    return ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


@pytest.mark.parametrize("name,seed", [("cvig_nano", 0), ("cvig_ti", 1)])
def test_plugin_graph_equals_pure_graph(tmp_path, name, seed):
    """Surgery replaces every DEGC piece; on the host kernels every block's labels and neighbour sets
    equal the pure graph's and the logits agree within 1e-5."""
    model, photos, g = exported(tmp_path, name, seed)
    pg, rep = to_plugin_graph(g)
    onnx.checker.check_model(pg, full_check=True)
    depth = model.cfg.depth
    assert rep.replaced == {"CvigKMeans": depth, "CvigPartitionedKNN": depth, "CvigGatherMaxRel": depth}
    if name == "cvig_ti":
        assert rep.nodes_before >= 5 * rep.nodes_after  # acceptance: >= 5x fewer nodes
    a, b, blocks = run_both(g, photos.numpy())
    assert blocks == depth and len(a) == len(b) == 1 + 2 * depth
    assert_same_graph(a, b, depth)
    assert np.abs(a[0] - b[0]).max() <= 1e-5


def test_every_grapher_is_replaced_with_parser_attributes(tmp_path):
    model, _, g = exported(tmp_path, "cvig_ti", seed=1)
    pg, _ = to_plugin_graph(g)
    nodes = {n.name: n for n in pg.graph.node}
    for i, k in enumerate(model.cfg.neighbors):
        km = nodes[f"blocks.{i}.grapher.degc/kmeans/CvigKMeans"]
        nn = nodes[f"blocks.{i}.grapher.degc/knn/CvigPartitionedKNN"]
        assert nodes[f"blocks.{i}.grapher.degc/local/gather_max_rel/CvigGatherMaxRel"].op_type == "CvigGatherMaxRel"
        a = {x.name: onnx.helper.get_attribute_value(x) for x in km.attribute}
        assert a == {"clusters": 4, "iters": 20, "plugin_version": b"1", "plugin_namespace": b""}
        assert onnx.helper.get_attribute_value(next(x for x in nn.attribute if x.name == "k")) == k
        assert not any(n.name.startswith(f"blocks.{i}.grapher.degc/kmeans/") and n.op_type in ("ArgMin", "MatMul")
                       for n in pg.graph.node)
    # plugin I/O label and index tensors are int32
    inf = onnx.shape_inference.infer_shapes(pg)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inf.graph.value_info}
    casts = [n for n in pg.graph.node if n.name.endswith(("labels_to_int64", "idx_to_int64"))]
    assert casts and all(types.get(n.input[0], onnx.TensorProto.INT32) == onnx.TensorProto.INT32 for n in casts)


def test_all_pieces_including_segment_mean(tmp_path):
    from clustervig.export.plugin_graph import ALL_PIECES

    model, photos, g = exported(tmp_path, "cvig_ti", seed=1)
    pg, rep = to_plugin_graph(g, pieces=ALL_PIECES)
    assert rep.replaced["CvigSegmentMean"] == model.cfg.depth
    assert all(f"blocks.{i}.grapher.degc/centroids/CvigSegmentMean" in {n.name for n in pg.graph.node}
               for i in range(model.cfg.depth))
    x = photos.numpy()
    # numpy's and ONNX Runtime's float32 matmuls round the centroid sums differently (~1 ulp)
    assert np.abs(ort_session(pg).run(None, {"images": x})[0] - pure_logits(tmp_path, "cvig_ti", x)).max() <= 1e-4


def test_gin_plugin_graph_uses_validity(tmp_path):
    model, photos, g = exported(tmp_path, "cvig_nano", gcn="gin")
    pg, rep = to_plugin_graph(g)
    assert "CvigGatherMaxRel" not in rep.replaced  # G-GIN sums, it has no max-relative
    assert any(n.name.endswith("valid_to_bool") for n in pg.graph.node)
    x = photos.numpy()
    assert np.abs(ort_session(pg).run(None, {"images": x})[0] - pure_logits(tmp_path, "cvig_nano", x)).max() <= 1e-5


def test_missing_subgraph_is_an_error(tmp_path):
    _, _, g = exported(tmp_path, "cvig_nano")
    for n in g.graph.node:  # hide block 1's k-means from the surgery
        if n.name.startswith("blocks.1.grapher.degc/kmeans/"):
            n.name = n.name.replace("blocks.1.grapher.degc/kmeans/", "renamed/")
    with pytest.raises(SurgeryError, match=r"blocks\.1\.grapher\.degc/kmeans/ not found"):
        to_plugin_graph(g)


def test_graph_without_metadata_is_refused(tmp_path):
    _, _, g = exported(tmp_path, "cvig_nano")
    del g.metadata_props[:]
    with pytest.raises(SurgeryError, match="no clustervig.config metadata"):
        to_plugin_graph(g)


def test_cli_plugins(tmp_path):
    lib = tmp_path / "libcvig_plugins.so"
    lib.write_bytes(b"")  # only named in the printed trtexec line here (no TensorRT on this machine)
    out = tmp_path / "out"
    res = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--plugins", "--plugins-lib", str(lib), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model_plugins.onnx").is_file()
    assert f"trtexec --onnx={out / 'model_plugins.onnx'}" in res.output and f"--dynamicPlugins={lib}" in res.output
    bad = CliRunner().invoke(export_main, ["--model", "cvig_nano", "--plugins-lib", str(tmp_path / "missing.so"),
                                           "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    report = json.loads((out / "report.json").read_text())
    assert report["plugins"]["replaced"]["CvigKMeans"] == 3
    assert report["validation"]["results"]["photos"]["plugins vs fp32"]["max_abs_diff"] <= 1e-5
    assert "CvigPartitionedKNN" in res.output


# ----------------------------------------------------------------------------
# The CPU plugin graph runs the project's kernels (libcvig_kernels_host.so)
# ----------------------------------------------------------------------------


def with_graph_outputs(model: onnx.ModelProto, names):
    """A copy of ``model`` that also outputs the tensors ``names`` (types left to ONNX Runtime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return out


def run_both(pure: onnx.ModelProto, x: np.ndarray):
    """Logits, then every block's labels, then every block's neighbour indices, of both graphs.

    The boundaries are found by the export validation's own lookup (stable names; in the plugin
    graph the plugins' outputs), so this also checks what the export report compares.
    """
    from clustervig.export.validate import degc_boundary_tensors

    pg, _ = to_plugin_graph(pure)
    bp, bg = degc_boundary_tensors(pure), degc_boundary_tensors(pg)
    assert list(bp) == list(bg) and len(bp) > 0
    a = ort.InferenceSession(with_graph_outputs(pure, [t for p in bp.values() for t in p]).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"images": x})
    b = ort_session(with_graph_outputs(pg, [t for p in bg.values() for t in p])).run(None, {"images": x})
    # reorder [logits, l0, i0, l1, i1, ...] -> [logits, l0, l1, ..., i0, i1, ...]
    order = lambda outs: [outs[0]] + outs[1::2] + outs[2::2]  # noqa: E731
    return order(a), order(b), len(bp)


def assert_same_graph(a, b, depth):
    """Every block's labels equal; every token's neighbour set equal.

    Sets, not slot order: two neighbours whose similarities differ in the last
    float bit may come out in either order from ONNX Runtime's blocked matmul
    and the kernel's fixed-tree dot product (seen once in 14,112 slots of
    cvig_ti), and every local update aggregates over the set.
    """
    for blk in range(depth):
        np.testing.assert_array_equal(a[1 + blk], b[1 + blk], err_msg=f"labels of block {blk}")
        np.testing.assert_array_equal(np.sort(a[1 + depth + blk], -1), np.sort(b[1 + depth + blk], -1),
                                      err_msg=f"neighbours of block {blk}")


def test_plugin_graph_calls_the_host_kernels(tmp_path, monkeypatch):
    from clustervig.plugins import kernels

    calls = {"kmeans": 0, "partitioned_knn": 0, "gather_max_rel": 0}
    for fn in calls:
        real = getattr(kernels, fn)

        def counted(*args, _real=real, _fn=fn, **kw):
            calls[_fn] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, fn, counted)
    _, photos, g = exported(tmp_path, "cvig_nano")
    pg, _ = to_plugin_graph(g)
    ort_session(pg).run(None, {"images": photos.numpy()})
    assert calls == {"kmeans": 3, "partitioned_knn": 3, "gather_max_rel": 3}  # one call per block and op


def test_plugin_graph_digits_test_split(tmp_path):
    import clustervig
    from clustervig.data import digits_split
    from clustervig.train import WEIGHTS_DIR

    model = clustervig.create_model("cvig_digits", pretrained=WEIGHTS_DIR / "cvig_digits.pth").eval()
    export_onnx(model, tmp_path / "digits.onnx", BatchSpec(1, 64, 64), simplify=True)
    _, te = digits_split()
    x = te.images.numpy()
    a, b, depth = run_both(onnx.load(str(tmp_path / "digits.onnx")), x)
    assert len(a) == 1 + 2 * depth
    assert_same_graph(a, b, depth)
    assert np.abs(a[0] - b[0]).max() <= 1e-4
    y = te.labels.numpy()
    top_pure, top_plugin = (a[0].argmax(1) == y).mean(), (b[0].argmax(1) == y).mean()
    assert top_plugin == top_pure and top_pure >= 0.97


def test_python_op_outputs_cross_as_arrays():
    # onnxruntime-extensions' stock bridge turns every output into a Python list (seconds per cvig_ti
    # batch); ort_ops installs a hook that hands arrays over: this fails if the package's internals move
    from clustervig.plugins import ort_ops

    assert ort_ops._install_array_hook()


def test_compare_runs_plugin_graphs_on_the_host_kernels(tmp_path):
    from clustervig.export.compare import main as compare_main

    _, _, g = exported(tmp_path, "cvig_nano")
    pg, _ = to_plugin_graph(g)
    onnx.save(pg, str(tmp_path / "model_plugins.onnx"))
    res = CliRunner().invoke(compare_main, [str(tmp_path / "cvig_nano.onnx"), str(tmp_path / "model_plugins.onnx"),
                                            "--atol", "1e-4", "--rtol", "1e-4"])
    assert res.exit_code == 0 and "PASSED" in res.output, res.output
    res = CliRunner().invoke(compare_main, [str(tmp_path / "cvig_nano.onnx"), "--plugins-lib", str(tmp_path / "x.so")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_authors_numerics_plugin_graph(tmp_path):
    """numerics="authors": k-means on the centred tokens with its centroids (empty -> 0) becomes
    CvigKMeansCentroids, whose centroids feed GATv2; labels, neighbours and logits equal the pure graph."""
    model, photos, g = exported(tmp_path, "cvig_nano", numerics="authors")
    pg, rep = to_plugin_graph(g)
    onnx.checker.check_model(pg, full_check=True)
    depth = model.cfg.depth
    assert rep.replaced == {"CvigKMeansCentroids": depth, "CvigPartitionedKNN": depth, "CvigGatherMaxRel": depth}
    nodes = {n.name: n for n in pg.graph.node}
    for i in range(depth):
        km = nodes[f"blocks.{i}.grapher.degc/kmeans/CvigKMeansCentroids"]
        a = {x.name: onnx.helper.get_attribute_value(x) for x in km.attribute}
        assert a == {"clusters": model.cfg.clusters, "iters": 20, "empty_zero": 1, "plugin_version": b"1",
                     "plugin_namespace": b""}
        assert km.input[0].startswith(f"blocks.{i}.grapher.degc/norm/")  # the centred tokens
        assert not any(n.name.startswith(f"blocks.{i}.grapher.degc/kmeans/") and n.op_type in ("ArgMin", "MatMul")
                       for n in pg.graph.node)
        # the centroid output is read by GATv2
        readers = [n.name for n in pg.graph.node if km.output[2] in n.input]
        assert readers and all(r.startswith(f"blocks.{i}.grapher.degc/gat/") for r in readers), readers
    a, b, blocks = run_both(g, photos.numpy())
    assert blocks == depth
    assert_same_graph(a, b, depth)
    assert np.abs(a[0] - b[0]).max() <= 1e-5
