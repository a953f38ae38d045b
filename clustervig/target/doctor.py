"""``cvig doctor``: what this machine has, and a self-test of everything clustervig-trt can run on it.

The first machine where the CUDA kernels, the TensorRT plugins and engines execute is usually a user's
(a Jetson, a GPU server), so this is the command to run there first. It prints versions and the
libraries it finds, then runs each check, smallest first, with PASS, FAIL or SKIPPED (with the reason):

* host kernels: ``libcvig_kernels_host.so`` against the numpy references on small cases;
* ONNX Runtime: a model exported here, run by ONNX Runtime, against PyTorch; its plugin graph on the
  host kernels against the pure graph;
* CUDA kernels: ``libcvig_kernels.so`` bit-identical to the host kernels (needs a GPU and the library);
* TensorRT plugins: each plugin alone in a one-layer engine, FP32 and FP16, bit-identical to the host
  kernel (needs TensorRT, a GPU and ``libcvig_plugins.so``);
* TensorRT engine: a small exported model's engine against ONNX Runtime on the packaged photographs.

Exit code 1 when a check fails; ``--json`` prints the same as data.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import click
import numpy as np

from ..cliutil import CTX

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"


class Skip(Exception):
    """A check that cannot run here; the message says why and what would make it run."""


@dataclass
class Check:
    name: str
    status: str
    detail: str
    seconds: float = 0.0


# ----------------------------------------------------------------------------
# What the machine has
# ----------------------------------------------------------------------------


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a package that fails to import counts as absent
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _nvidia_smi(query: str) -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    res = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
    out = res.stdout.strip().splitlines()
    return out[0].strip() if res.returncode == 0 and out else None


def versions() -> Dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("clustervig-trt")
    except PackageNotFoundError:
        pkg = None
    info: Dict[str, Optional[str]] = {
        "clustervig-trt": pkg, "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
        "torch": _version("torch"), "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        info["onnxruntime providers"] = None
    info["CUDA driver"] = _nvidia_smi("driver_version")
    gpu = _gpu()
    info["torch CUDA runtime"] = gpu.get("cuda")
    info["GPU"] = gpu.get("name")
    info["compute capability"] = gpu.get("capability")
    return info


def _gpu() -> Dict[str, Optional[str]]:
    try:
        import torch
    except Exception:  # noqa: BLE001
        return {}
    out: Dict[str, Optional[str]] = {"cuda": torch.version.cuda}
    try:
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(0)
            out.update(name=torch.cuda.get_device_name(0), capability=f"{cap[0]}.{cap[1]}")
    except Exception:  # noqa: BLE001 - a driver/runtime mismatch: no usable GPU
        pass
    return out


def libraries() -> Dict[str, Optional[str]]:
    """Where each library and source tree is (None: not found), and where build-plugins records."""
    from ..plugins import kernels as K
    from ..plugins import locations

    found: Dict[str, Optional[str]] = {}
    try:
        host = K.find_host_library(build=False)
        kind = "prebuilt in the package" if host == K.packaged_host_library() else "built from the sources"
        found["host kernels"] = f"{host} ({kind})"
    except K.KernelLibraryError:
        found["host kernels"] = None if K.INSTALLED else "built from the checkout's plugins/ on first use"
    try:
        found["CUDA kernels"] = str(K.find_library())
    except K.KernelLibraryError:
        found["CUDA kernels"] = None
    plugins = locations.plugin_library()
    found["TensorRT plugins"] = str(plugins) if plugins and plugins.is_file() else None
    auto = locations.recorded("plugins_autoreg")
    found["TensorRT plugins (self-registering)"] = str(auto) if auto else None
    found["kernel and plugin sources"] = str(K.PLUGINS)
    from .. import runtime

    cpp = Path(runtime.__file__).resolve().parent / "cpp"
    found["C++ runtime sources"] = str(cpp) if cpp.is_dir() else None
    found["record of cvig build-plugins"] = str(locations.record_file())
    return found


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------


def _tokens(b: int, n: int, c: int, seed: int, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((b, n, c))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def check_host_kernels() -> str:
    from ..plugins import kernels as K
    from ..plugins import reference as R

    lib = K.host_library()
    x32 = _tokens(2, 97, 24, 0)
    lab, cnt = K.kmeans(x32, 5, 10, lib=lib)
    ref_l, ref_c = R.kmeans_ref(x32, 5, 10)
    _equal(lab, ref_l, "k-means labels")
    _equal(cnt, ref_c, "k-means counts")
    x16 = _tokens(2, 97, 24, 1, np.float16)
    _equal(K.kmeans(x16, 5, 10, lib=lib)[0], R.kmeans_ref(x16.astype(np.float32), 5, 10)[0], "k-means FP16 labels")
    idx, valid = K.partitioned_knn(x32, lab, 9, lib=lib)
    ref_i, ref_v = R.partitioned_knn_ref(x32, lab, 9)
    _equal(idx, ref_i, "k-NN indices")
    _equal(valid, ref_v, "k-NN valid flags")
    z, counts = K.segment_mean(x32, lab, 5, lib=lib)
    ref_z, ref_n = R.segment_mean_ref(x32.astype(np.float64), lab, 5)
    _equal(counts, ref_n, "segment counts")
    _close(z, ref_z, 1e-6, "segment means")
    out = K.gather_max_rel(x32, idx, lib=lib)
    _equal(out, R.gather_max_rel_ref(x32, idx), "gather-max-rel")
    cx = (np.random.default_rng(4).standard_normal((2, 97, 24)) * 2).astype(np.float32)
    cl, cc, cz = K.kmeans_centroids(cx, 5, 10, True, lib=lib)
    rl, rc, rz = R.kmeans_centroids_ref(cx, 5, 10, True)
    _equal(cl, rl, "k-means-with-centroids labels")
    _close(cz, rz, 2e-5, "k-means centroids")
    return f"{Path(lib.path).name}: k-means (FP32, FP16, with centroids), k-NN, segment mean and gather-max-rel equal the numpy references"


def _equal(a, b, what: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not np.array_equal(a, b):
        bad = int((a != b).sum()) if a.shape == b.shape else "shape"
        raise AssertionError(f"{what} differ ({bad} of {b.size} elements)")


def _close(a, b, atol: float, what: str) -> None:
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    if not err <= atol:
        raise AssertionError(f"{what} differ by {err:.3g} (allowed {atol:g})")


def _digits_onnx(folder: Path, batch: int = 4):
    """The packaged cvig_digits checkpoint exported to ONNX in ``folder``: (model, path, inputs)."""
    import torch

    from .. import model_from_checkpoint
    from ..export.onnx_export import BatchSpec, export_onnx

    weights = Path(__file__).resolve().parents[1] / "weights" / "cvig_digits.pth"
    model = model_from_checkpoint(weights).eval()
    path = folder / "digits.onnx"
    export_onnx(model, path, BatchSpec(batch, batch, batch))
    size = model.cfg.img_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, path, x


def check_onnxruntime() -> str:
    import onnx
    import onnxruntime as ort
    import torch

    from ..export.plugin_graph import ort_session, to_plugin_graph

    with tempfile.TemporaryDirectory() as tmp:
        model, path, x = _digits_onnx(Path(tmp))
        with torch.no_grad():
            ref = model(x).numpy()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        _close(got, ref, 1e-3, "ONNX Runtime logits vs PyTorch")
        if not np.array_equal(got.argmax(1), ref.argmax(1)):
            raise AssertionError("ONNX Runtime and PyTorch disagree on a top-1 class")
        plug, _ = to_plugin_graph(onnx.load(str(path)))
        psess = ort_session(plug)
        pout = psess.run(None, {psess.get_inputs()[0].name: x.numpy()})[0]
        _close(pout, got, 1e-4, "plugin graph (host kernels) vs pure graph")
    return (f"cvig_digits exported here: ONNX Runtime (CPU) = PyTorch (max |diff| {np.abs(got - ref).max():.1e}); "
            "its plugin graph on the host kernels = the pure graph")


def _need_gpu():
    try:
        import torch
    except ImportError:
        raise Skip("PyTorch is not installed") from None
    if not torch.cuda.is_available():
        raise Skip(f"no CUDA GPU (torch {torch.__version__}, "
                   f"{'built with CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'})")
    return torch


def check_cuda_kernels() -> str:
    from ..plugins import kernels as K

    torch = _need_gpu()
    try:
        cuda = K.cuda_library()
    except K.KernelLibraryError:
        raise Skip("libcvig_kernels.so is not built: run `cvig build-plugins` (needs nvcc)") from None
    ks = K.Kernels(path=str(cuda.path))
    host = K.Kernels()
    cases = 0
    for name, x in (("FP32", _tokens(2, 196, 64, 5)), ("FP16", _tokens(2, 196, 64, 6, np.float16))):
        t = torch.from_numpy(x)
        lab_h, cnt_h = host.kmeans(t, 4, 20)
        lab_d, cnt_d = ks.kmeans(t.cuda(), 4, 20)
        _equal(lab_d.cpu().numpy(), lab_h.numpy(), f"k-means labels {name}")
        _equal(cnt_d.cpu().numpy(), cnt_h.numpy(), f"k-means counts {name}")
        i_h, v_h = host.partitioned_knn(t, lab_h, 9)
        i_d, v_d = ks.partitioned_knn(t.cuda(), lab_h.cuda(), 9)
        _equal(i_d.cpu().numpy(), i_h.numpy(), f"k-NN indices {name}")
        _equal(v_d.cpu().numpy(), v_h.numpy(), f"k-NN flags {name}")
        z_h, n_h = host.segment_mean(t, lab_h, 4)
        z_d, n_d = ks.segment_mean(t.cuda(), lab_h.cuda(), 4)
        _equal(z_d.cpu().numpy().view(np.uint8), z_h.numpy().view(np.uint8), f"segment means {name}")
        g_h = host.gather_max_rel(t, i_h)
        g_d = ks.gather_max_rel(t.cuda(), i_h.cuda())
        _equal(g_d.cpu().numpy().view(np.uint8), g_h.numpy().view(np.uint8), f"gather-max-rel {name}")
        cases += 4
    torch.cuda.synchronize()
    return f"{cuda.path}: {cases} launches on {torch.cuda.get_device_name(0)} bit-identical to the host kernels"


def _need_tensorrt():
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - absent, or a stub package that fails to import
        raise Skip(f"TensorRT is not installed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'no module'}); "
                   "JetPack ships it on Jetson, NVIDIA's wheels or archives on a desktop") from None
    return trt


def check_trt_plugins() -> str:
    from ..plugins import kernels as K
    from ..plugins import locations
    from . import plugin_layers

    trt = _need_tensorrt()
    _need_gpu()
    lib = locations.plugin_library()
    if lib is None or not lib.is_file():
        raise Skip("libcvig_plugins.so is not built: run `cvig build-plugins`")
    host = K.host_library()
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in plugin_layers.cases():
            for dtype in (np.float32, np.float16):
                feed, expected = case.run_host(dtype, host)
                onnx_path = Path(tmp) / f"{case.op}_{np.dtype(dtype).name}.onnx"
                plugin_layers.save(case.graph(dtype), onnx_path)
                got = plugin_layers.run_tensorrt(trt, onnx_path, lib, feed)
                for name, want in expected.items():
                    _equal(np.asarray(got[name]).view(np.uint8), np.ascontiguousarray(want).view(np.uint8),
                           f"{case.op} {np.dtype(dtype).name} output {name}")
                done.append(f"{case.op}/{'FP32' if dtype == np.float32 else 'FP16'}")
    return f"TensorRT {trt.__version__}, {lib}: {len(done)} one-layer engines bit-identical to the host kernels"


def check_trt_engine() -> str:
    import torch

    from ..export.compare import trt_runner
    from ..export.onnx_export import BatchSpec, export_onnx
    from ..export.trt_build import build_engine
    from ..preprocess import sample_photographs, transform_spec
    from .. import create_model

    trt = _need_tensorrt()
    _need_gpu()
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model("cvig_nano").eval()
    photos = sample_photographs(transform_spec(model.cfg)).numpy().astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, plan = Path(tmp) / "nano.onnx", Path(tmp) / "nano.plan"
        batch = BatchSpec(len(photos), len(photos), len(photos))
        export_onnx(model, onnx_path, batch)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        want = sess.run(None, {sess.get_inputs()[0].name: photos})[0]
        build_engine(onnx_path, plan, batch, model.cfg.img_size)
        runner = trt_runner(plan)
        with runner:
            got = np.asarray(next(iter(runner.infer({"images": photos}).values())), np.float32)
    cos = float(np.sum(got * want) / (np.linalg.norm(got) * np.linalg.norm(want)))
    same = int((got.argmax(1) == want.argmax(1)).sum())
    if cos < 0.999 or same < len(photos):
        raise AssertionError(f"engine vs ONNX Runtime: cosine {cos:.6f}, top-1 agreement {same}/{len(photos)} "
                             "(expected >= 0.999 and all)")
    return f"TensorRT {trt.__version__}: cvig_nano FP32 engine = ONNX Runtime on {len(photos)} photographs (cosine {cos:.6f})"


CHECKS: List[Tuple[str, Callable[[], str]]] = [
    ("host kernels", check_host_kernels),
    ("ONNX Runtime", check_onnxruntime),
    ("CUDA kernels", check_cuda_kernels),
    ("TensorRT plugins", check_trt_plugins),
    ("TensorRT engine", check_trt_engine),
]


def run_checks(checks=None, progress: Optional[Callable[[Check], None]] = None) -> List[Check]:
    results = []
    for name, fn in checks or CHECKS:
        t0 = time.perf_counter()
        try:
            c = Check(name, PASS, fn())
        except Skip as exc:
            c = Check(name, SKIPPED, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            c = Check(name, FAIL, f"{type(exc).__name__}: {msg}"[:500])
        c.seconds = round(time.perf_counter() - t0, 2)
        results.append(c)
        if progress:
            progress(c)
    return results


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------


@click.command("doctor", context_settings=CTX, epilog="""
\b
Examples:
  cvig doctor                 # on a new target machine, first
  cvig doctor --json > doctor.json
  cvig build-plugins && cvig doctor   # build the CUDA/TensorRT libraries, then check them
""")
@click.option("--json", "as_json", is_flag=True, help="Print the versions, libraries and checks as JSON.")
def command(as_json: bool) -> None:
    """Print the versions and libraries this machine has, then self-test what it can run: the host kernels
    against numpy, ONNX Runtime against PyTorch, the CUDA kernels against the host kernels (with a GPU),
    each TensorRT plugin and a small engine (with TensorRT). Each check says PASS, FAIL or SKIPPED with
    the reason; the exit code is 1 when one fails."""
    info, libs = versions(), libraries()
    if not as_json:
        width = max(len(k) for k in list(info) + list(libs))
        for k, v in info.items():
            click.echo(f"{k:<{width}}  {v if v is not None else 'not found'}")
        click.echo("")
        for k, v in libs.items():
            click.echo(f"{k:<{width}}  {v if v is not None else 'not found'}")
        click.echo("")

    def show(c: Check) -> None:
        if not as_json:
            click.echo(f"{c.status:<8} {c.name:<17} {c.detail} ({c.seconds:.1f} s)")

    results = run_checks(progress=show)
    failed = [c for c in results if c.status == FAIL]
    if as_json:
        click.echo(json.dumps({"versions": info, "libraries": libs, "checks": [asdict(c) for c in results],
                               "ok": not failed}, indent=2))
    else:
        counts = {s: sum(c.status == s for c in results) for s in (PASS, FAIL, SKIPPED)}
        click.echo(f"\n{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped")
    if failed:
        sys.exit(1)
