"""cvig-compare: Polygraphy comparisons of PyTorch, ONNX Runtime and TensorRT on the same inputs.

Runners follow Polygraphy's activate / infer / deactivate shape; the
comparison itself is Polygraphy's Comparator with CompareFunc.simple.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc

import clustervig
from clustervig.checkpoint import CheckpointError, model_from_checkpoint
from clustervig.preprocess import sample_photographs

from .onnx_export import INPUT, OUTPUT, get_metadata
from .plugin_graph import PLUGIN_DOMAIN, ort_session
from .trt_build import TensorRTUnavailable, load_plugin_library

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


class TorchRunner(BaseRunner):
    """The PyTorch static form as a Polygraphy runner."""

    def __init__(self, model: clustervig.ClusterViG, name: Optional[str] = None) -> None:
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model

    def activate_impl(self) -> None:
        self.model.eval()

    def get_input_metadata_impl(self):
        s = self.model.cfg.img_size
        return TensorMetadata().add(INPUT, np.float32, (-1, 3, s, s))

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT], dtype=np.float32)))
        self.inference_time = time.perf_counter() - start  # Polygraphy's Comparator sums these
        return OrderedDict([(OUTPUT, out.numpy())])

    def deactivate_impl(self) -> None:
        pass


class CastingOnnxrtRunner(OnnxrtRunner):
    """ONNX Runtime runner that feeds float16 to graphs with FP16 inputs and reports FP32 outputs."""

    def infer_impl(self, feed_dict, *args, **kwargs):
        want = {i.name: i.type for i in self.sess.get_inputs()}
        feed = {k: (v.astype(np.float16) if "float16" in want.get(k, "") else v) for k, v in feed_dict.items()}
        out = super().infer_impl(feed, *args, **kwargs)
        return OrderedDict((k, np.asarray(v, dtype=np.float32)) for k, v in out.items())


def onnx_runner(path: Path, graph: Optional[onnx.ModelProto] = None) -> BaseRunner:
    name = f"onnxrt:{Path(path).name}"
    if graph is not None and any(n.domain == PLUGIN_DOMAIN for n in graph.graph.node):
        # a plugin graph: its Cvig* nodes run the host build of the plugin kernels
        return CastingOnnxrtRunner(lambda: ort_session(graph), name=name)
    return CastingOnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=name)


def trt_runner(path: Path, plugins_lib: Optional[Path] = None) -> BaseRunner:
    try:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        import tensorrt as trt
    except ImportError:
        raise click.ClickException(f"{path}: comparing a TensorRT engine needs the tensorrt package, which is not "
                                   "installed here") from None
    if plugins_lib is not None:  # an engine of the plugin graph deserialises only with the plugins registered
        try:
            load_plugin_library(trt, plugins_lib)
        except TensorRTUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    return TrtRunner(EngineFromBytes(Path(path).read_bytes()), name=f"tensorrt:{Path(path).name}")


def feeds(img_size: int, batch: int, kind: str) -> List[Dict[str, np.ndarray]]:
    spec = {"img_size": img_size, "crop_pct": 0.9, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    if kind == "photos":
        x = sample_photographs(spec)
    else:
        x = torch.randn(max(batch, 4), 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    reps = -(-batch // len(x))
    x = x.repeat(reps, 1, 1, 1)
    return [{INPUT: x[i : i + batch].numpy()} for i in range(0, len(x) - batch + 1, batch)][:4]


def run_compare(artifacts: List[Path], model: Optional[clustervig.ClusterViG], atol: float, rtol: float,
                inputs: str, batch: Optional[int], plugins_lib: Optional[Path] = None) -> bool:
    runners: List[BaseRunner] = []
    if model is not None:
        runners.append(TorchRunner(model, name="pytorch"))
    img_size, static_batch = None, None
    for p in artifacts:
        if p.suffix in (".plan", ".engine", ".trt"):
            runners.append(trt_runner(p, plugins_lib))
            continue
        try:
            g = onnx.load(str(p), load_external_data=False)
        except Exception as exc:
            raise click.ClickException(f"{p} is not a readable ONNX file ({type(exc).__name__}); re-export it") from None
        dims = g.graph.input[0].type.tensor_type.shape.dim
        img_size = dims[2].dim_value or img_size
        if dims[0].dim_value:
            static_batch = dims[0].dim_value
        runners.append(onnx_runner(p, g))
    if img_size is None:
        img_size = model.cfg.img_size if model is not None else 224
    b = batch or static_batch or 1
    if len(runners) < 2:
        raise click.UsageError("need at least two things to compare: several artifacts, or one with --checkpoint")
    results = Comparator.run(runners, data_loader=feeds(img_size, b, inputs))
    ok = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol)))
    return ok


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True}, epilog="""
\b
Examples:
  cvig-compare out/model_fp32.onnx --checkpoint ck.pth          # PyTorch vs ONNX Runtime
  cvig-compare out/model_fp32.onnx out/model_fp16.onnx --atol 0.05 --rtol 0.05
  cvig-compare out/model_fp16.plan --checkpoint ck.pth          # needs TensorRT
  cvig-compare out/model_fp32.onnx out/model_plugins.onnx        # plugin graph on the host kernels
  cvig-compare out/model_fp32.onnx out/model_plugins.plan --plugins-lib build/plugins/libcvig_plugins.so
""")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Add the PyTorch static form (first runner, the reference) from this checkpoint.")
@click.option("--model", "model_name", type=click.Choice(clustervig.list_models()), default=None,
              help="Variant for --checkpoint (default: read from the checkpoint or the ONNX metadata).")
@click.option("--atol", type=float, default=DEFAULT_ATOL)
@click.option("--rtol", type=float, default=DEFAULT_RTOL)
@click.option("--inputs", type=click.Choice(["photos", "random"]), default="photos",
              help="Real photographs (scikit-image) or random tensors.")
@click.option("--batch", type=int, default=None, help="Batch size (default: the ONNX input's static batch, else 1).")
@click.option("--plugins-lib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="libcvig_plugins.so, for TensorRT engines of the plugin graph (plugin graphs in ONNX need none: "
                   "they run on the host kernels).")
def main(artifacts, checkpoint, model_name, atol, rtol, inputs, batch, plugins_lib):
    """Compare ClusterViG artifacts with each other and with PyTorch (Polygraphy Comparator).
    Exits non-zero when any pair differs beyond the tolerances."""
    model = None
    if checkpoint is not None:
        try:
            if model_name is None:
                try:
                    model = model_from_checkpoint(checkpoint)
                except CheckpointError:
                    meta = get_metadata(onnx.load(str(artifacts[0]), load_external_data=False)) if artifacts[0].suffix == ".onnx" else {}
                    cfg = json.loads(meta.get("clustervig.config", "{}"))
                    if not cfg:
                        raise
                    model = clustervig.create_model(cfg["name"], pretrained=checkpoint, num_classes=cfg["num_classes"],
                                                    gcn=cfg["gcn"])
            else:
                model = clustervig.create_model(model_name, pretrained=checkpoint)
        except (CheckpointError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        model.eval()
    ok = run_compare(list(artifacts), model, atol, rtol, inputs, batch, plugins_lib)
    click.echo("PASSED" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
