"""A real Triton Inference Server serving a repository written by `cvig export --triton-backend python`.

The server is nvidia-pytriton's tritonserver 2.51 (Python backend) in its own
pip environment (clustervig.runtime.triton_local: pinned, numpy < 2), started on
127.0.0.1 with free ports. One repository holds cvig_nano with a dynamic batch
(1:4:8) and the digits model with a static batch of 1. Checked: readiness;
logits over HTTP and gRPC against `cvig run --json` on photographs; class
names through the classification extension; wrong shapes, dtypes, names and
models answered with errors while the server keeps serving; concurrent
clients forming batches larger than 1 (the server's statistics and its
metrics port); stopping by PID leaves no process behind.

Skipped, with pip's message, only where the server environment cannot be
installed (no access to PyPI).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from clustervig.export.cli import main as export_main
from clustervig.preprocess import load_batch
from clustervig.runtime.cli import run_main
from clustervig.runtime.triton_local import LocalTriton, TritonSetupError, ensure_env, metric_values
from clustervig.train import WEIGHTS_DIR

NANO, DIGITS = "cvig_nano_python", "cvig_digits_python"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


@pytest.fixture(scope="module")
def server_env():
    try:
        return ensure_env()
    except TritonSetupError as exc:
        pytest.skip(f"the Triton server environment cannot be installed here: {exc}")


def _export(args, out: Path) -> None:
    res = CliRunner().invoke(export_main, [*args, "--no-validate", "-o", str(out)])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def served(tmp_path_factory, server_env):
    from PIL import Image
    from skimage import data

    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repo"
    _export(["--model", "cvig_nano", "--dynamic-batch", "1:4:8", "--triton-repo", str(repo),
             "--triton-backend", "python"], tmp / "nano")
    _export(["--checkpoint", str(WEIGHTS_DIR / "cvig_digits.pth"), "--triton-repo", str(repo),
             "--triton-backend", "python"], tmp / "digits")
    photos = []
    for name in PHOTOS:
        p = tmp / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(p)
        photos.append(p)
    server = LocalTriton(repo, server_env).start()
    try:
        yield SimpleNamespace(server=server, repo=repo, tmp=tmp, photos=photos)
    finally:
        server.stop()


def cvig_run(model: Path, files, batch: int = 1):
    res = CliRunner().invoke(run_main, [str(model), *map(str, files), "--json", "--topk", "3", "--batch", str(batch)])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def inputs(served, model_dir: str, files) -> np.ndarray:
    """The images as cvig run feeds them (the preprocessing recorded in the export)."""
    from clustervig.runtime import open_session

    with open_session(served.tmp / model_dir / "model_fp32.onnx") as s:
        return load_batch(files, s.preprocess).numpy()


def http_client(served):
    import tritonclient.http as th

    return th, th.InferenceServerClient(served.server.http_url, network_timeout=60.0, connection_timeout=10.0)


def grpc_client(served):
    import tritonclient.grpc as tg

    return tg, tg.InferenceServerClient(served.server.grpc_url)


def infer(mod, client, model: str, x: np.ndarray, class_count: int = 0, dtype: str = "FP32"):
    inp = mod.InferInput("images", list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[mod.InferRequestedOutput("logits", class_count=class_count)])


def test_server_and_models_are_ready(served):
    th, h = http_client(served)
    tg, g = grpc_client(served)
    assert served.server.ready() and h.is_server_live() and h.is_server_ready() and g.is_server_ready()
    for model in (NANO, DIGITS):
        assert h.is_model_ready(model) and g.is_model_ready(model)
    cfg = h.get_model_config(NANO)
    assert cfg["backend"] == "python" and cfg["max_batch_size"] == 8 and "dynamic_batching" in cfg
    assert h.get_model_config(DIGITS)["max_batch_size"] == 0
    meta = g.get_model_metadata(NANO, as_json=True)
    assert meta["inputs"][0]["shape"] == ["-1", "3", "224", "224"] and meta["outputs"][0]["datatype"] == "FP32"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_logits_equal_cvig_run(served, protocol):
    mod, client = (http_client if protocol == "http" else grpc_client)(served)
    ref = cvig_run(served.tmp / "nano" / "model_fp32.onnx", served.photos)
    x = inputs(served, "nano", served.photos)
    for i, r in enumerate(ref):
        got = infer(mod, client, NANO, x[i : i + 1]).as_numpy("logits")[0]
        want = np.asarray(r["logits"], np.float32)
        # the same graph in the same ONNX Runtime release, one image per run on both sides
        np.testing.assert_array_equal(got, want, err_msg=f"{protocol} logits of {served.photos[i].name}")
    # the static-batch digits model: one image per request, as its config says
    dref = cvig_run(served.tmp / "digits" / "model_fp32.onnx", served.photos[:2])
    dx = inputs(served, "digits", served.photos[:2])
    for i, r in enumerate(dref):
        got = infer(mod, client, DIGITS, dx[i : i + 1]).as_numpy("logits")[0]
        np.testing.assert_array_equal(got, np.asarray(r["logits"], np.float32))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_classification_extension_names_come_from_labels_txt(served, protocol):
    mod, client = (http_client if protocol == "http" else grpc_client)(served)
    ref = cvig_run(served.tmp / "nano" / "model_fp32.onnx", served.photos[:3])
    labels = (served.repo / NANO / "labels.txt").read_text().splitlines()
    x = inputs(served, "nano", served.photos[:3])
    res = infer(mod, client, NANO, x, class_count=3).as_numpy("logits")
    assert res.shape == (3, 3)
    for row, r in zip(res, ref):
        entries = [e.decode().split(":", 2) for e in row]  # "score:index:name"
        assert [int(i) for _, i, _ in entries] == [t["class"] for t in r["top"]]
        assert [n for _, _, n in entries] == [labels[t["class"]] for t in r["top"]] == [t["name"] for t in r["top"]]
        np.testing.assert_allclose([float(s) for s, _, _ in entries], [t["logit"] for t in r["top"]], rtol=1e-5, atol=1e-6)  # printed with 6 digits


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_errors_and_the_server_keeps_answering(served, protocol):
    from tritonclient.utils import InferenceServerException

    mod, client = (http_client if protocol == "http" else grpc_client)(served)
    good = inputs(served, "nano", served.photos[:1])
    cases = [
        (lambda: infer(mod, client, NANO, np.zeros((1, 3, 64, 64), np.float32)), "shape"),
        (lambda: infer(mod, client, NANO, good.astype(np.float16), dtype="FP16"), "FP16"),
        (lambda: infer(mod, client, NANO, np.zeros((9, 3, 224, 224), np.float32)), "batch"),  # above max_batch_size 8
        (lambda: infer(mod, client, DIGITS, np.zeros((2, 3, 32, 32), np.float32)), "shape"),  # static batch of 1
        (lambda: infer(mod, client, "no_such_model", good), "no_such_model"),
    ]
    for call, word in cases:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert word.lower() in str(err.value).lower(), str(err.value)
    # a request with another input name
    inp = mod.InferInput("pixels", list(good.shape), "FP32")
    inp.set_data_from_numpy(good)
    with pytest.raises(InferenceServerException, match="pixels"):
        client.infer(NANO, [inp])
    assert served.server.proc.poll() is None and served.server.ready()
    ref = cvig_run(served.tmp / "nano" / "model_fp32.onnx", served.photos[:1])[0]
    np.testing.assert_array_equal(infer(mod, client, NANO, good).as_numpy("logits")[0], np.asarray(ref["logits"], np.float32))


def _batch_stats(served, model: str):
    _, h = http_client(served)
    stats = h.get_inference_statistics(model)["model_stats"][0]
    return stats, {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def test_concurrent_clients_form_batches(served):
    """8 client threads, 3 single-image requests each: the dynamic batcher runs them in batches > 1, every
    answer equals the image's own logits, and the metrics port counts more inferences than executions."""
    import tritonclient.grpc as tg

    x = inputs(served, "nano", served.photos)
    ref = cvig_run(served.tmp / "nano" / "model_fp32.onnx", served.photos)
    before, sizes_before = _batch_stats(served, NANO)
    results, errors = [], []
    start = threading.Barrier(8)

    def client(t):
        c = tg.InferenceServerClient(served.server.grpc_url)
        try:
            start.wait(30)
            for k in range(3):
                i = (t + k) % len(x)
                results.append((i, infer(tg, c, NANO, x[i : i + 1]).as_numpy("logits")[0]))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 24, errors
    for i, got in results:  # batched with other requests: equal to the image alone within float rounding
        np.testing.assert_allclose(got, np.asarray(ref[i]["logits"], np.float32), rtol=0, atol=1e-4)
        assert int(np.argmax(got)) == ref[i]["top"][0]["class"]
    # the server records a batch's statistics after sending its responses: poll until all 24 are counted
    deadline = time.monotonic() + 10
    while True:
        after, sizes = _batch_stats(served, NANO)
        formed = {b: n - sizes_before.get(b, 0) for b, n in sizes.items() if n - sizes_before.get(b, 0) > 0}
        if sum(b * n for b, n in formed.items()) >= 24 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(b * n for b, n in formed.items()) == 24, formed
    assert max(formed) > 1, f"no batch larger than 1 formed: {formed}"
    # the metrics port: inferences (images) exceed executions (batches)
    deadline = time.monotonic() + 10
    while True:
        text = served.server.metrics()
        count = sum(metric_values(text, "nv_inference_count").values())
        execs = sum(metric_values(text, "nv_inference_exec_count").values())
        if count >= after["inference_count"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert count > execs and count == int(after["inference_count"]) + int(
        _batch_stats(served, DIGITS)[0]["inference_count"]), (count, execs)


def _processes_in_group(pgid: int):
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state ppid pgrp ...
                found.append(int(d.name))
    return found


def test_stop_by_pid_leaves_nothing_running(served):
    server = served.server
    pid = server.pid
    assert _processes_in_group(pid), "the server and its Python backend stub run in their own process group"
    code = server.stop()
    assert code is not None and server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _processes_in_group(pid) == []
    assert not served.server.ready()
