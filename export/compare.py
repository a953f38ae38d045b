"""cvig-compare: Polygraphy comparisons of PyTorch, ONNX Runtime and TensorRT on the same inputs.

Runners follow Polygraphy's activate / infer / deactivate shape; the
comparison itself is Polygraphy's Comparator with CompareFunc.simple.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import click
import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.exception import PolygraphyException

import clustervig
from clustervig.checkpoint import CheckpointError, recorded_config
from clustervig.checkpoint import build_model as build_checked_model
from clustervig.cliutil import CTX, MODEL_NAME, existing_file, model_help
from clustervig.preprocess import sample_photographs, spec_hw, transform_spec
from clustervig.runtime.session import RuntimeErrorWithFix, engine_metadata, plugin_library_for

from .onnx_export import INPUT, OUTPUT, get_metadata
from .plugin_graph import PLUGIN_DOMAIN, ort_session
from .trt_build import TensorRTUnavailable, load_plugin_library

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4


class TorchRunner(BaseRunner):
    """The PyTorch static form as a Polygraphy runner."""

    def __init__(self, model: clustervig.ClusterViG, name: Optional[str] = None, normalize=None) -> None:
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model
        # artifacts exported with the normalisation in the graph take RGB in [0, 1]: so does this runner
        self.normalize = None if normalize is None else tuple(
            torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in normalize)

    def activate_impl(self) -> None:
        self.model.eval()

    def get_input_metadata_impl(self):
        return TensorMetadata().add(INPUT, np.float32, (-1, 3, *self.model.cfg.img_hw))

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(feed_dict[INPUT], dtype=np.float32))
            if self.normalize is not None:
                x = (x - self.normalize[0]) / self.normalize[1]
            out = self.model(x)
        self.inference_time = time.perf_counter() - start  # Polygraphy's Comparator sums these
        outs = self.model.cfg.feature_outputs()  # a backbone: its maps, named as the exported graph's outputs
        if outs is not None:
            return OrderedDict((o["name"], t.numpy()) for o, t in zip(outs, out))
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


def _runner_names(paths: List[Path]) -> Dict[Path, str]:
    """Runner names: the file name, or the path as given where two artifacts share a file name."""
    counts: Dict[str, int] = {}
    for p in paths:
        counts[p.name] = counts.get(p.name, 0) + 1
    return {p: (p.name if counts[p.name] == 1 else str(p)) for p in paths}


def onnx_runner(path: Path, graph: Optional[onnx.ModelProto] = None, label: Optional[str] = None) -> BaseRunner:
    name = f"onnxrt:{label or Path(path).name}"
    if graph is not None and any(n.domain == PLUGIN_DOMAIN for n in graph.graph.node):
        # a plugin graph: its Cvig* nodes run the host build of the plugin kernels
        return CastingOnnxrtRunner(lambda: ort_session(graph), name=name)
    return CastingOnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name=name)


def trt_runner(path: Path, plugins_lib: Optional[Path] = None, label: Optional[str] = None) -> BaseRunner:
    try:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        import tensorrt as trt
    except ImportError:
        raise click.ClickException(f"{path}: comparing a TensorRT engine needs the tensorrt package, which is not "
                                   "installed here") from None
    try:
        plugins_lib = plugin_library_for(Path(path), plugins_lib)
    except RuntimeErrorWithFix as exc:
        raise click.ClickException(str(exc)) from None
    if plugins_lib is not None:  # an engine of the plugin graph deserialises only with the plugins registered
        try:
            load_plugin_library(trt, plugins_lib)
        except TensorRTUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    return TrtRunner(EngineFromBytes(Path(path).read_bytes()), name=f"tensorrt:{label or Path(path).name}")


IMAGENET_SPEC = {"img_size": 224, "crop_pct": 0.9, "interpolation": "bicubic",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "normalize_in_graph": False}


def feeds(spec: Dict, batch: int, kind: str) -> List[Dict[str, np.ndarray]]:
    """Up to four batches of the four sample photographs preprocessed by ``spec`` (the preprocessing the
    artifacts record; with normalize_in_graph, RGB in [0, 1]), or of random tensors."""
    h, w = spec_hw(spec)
    if kind == "photos":
        pre = dict(spec)
        if spec.get("normalize_in_graph"):
            pre.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
        x = sample_photographs(pre)
    else:
        x = torch.randn(max(batch, 4), 3, h, w, generator=torch.Generator().manual_seed(0))
    reps = -(-batch // len(x))
    x = x.repeat(reps, 1, 1, 1)
    return [{INPUT: x[i : i + batch].numpy()} for i in range(0, len(x) - batch + 1, batch)][:4]


def _recorded_shape(artifact: Path) -> Dict:
    """The input size and backbone outputs an artifact records (empty for a classifier at its variant's size):
    the options that rebuild its model from a checkpoint trained at another size or as a classifier."""
    try:
        meta = get_metadata(onnx.load(str(artifact), load_external_data=False)) if artifact.suffix == ".onnx" \
            else engine_metadata(artifact)
    except Exception:
        return {}
    cfg = json.loads(meta.get("clustervig.config", "{}"))
    if not cfg.get("features_only"):
        return {}
    return {"img_size": cfg["img_size"], "features_only": True, "out_indices": cfg.get("out_indices"),
            "feature_pyramid": bool(cfg.get("feature_pyramid"))}


def _describe(spec: Optional[Dict], cfg: Dict) -> str:
    parts = []
    if cfg.get("name"):
        parts.append(f"{cfg['name']}, {cfg.get('num_classes', '?')} classes")
    if spec:
        parts.append(f"{spec['img_size']} px, mean {list(spec['mean'])}, std {list(spec['std'])}, "
                     f"{spec.get('interpolation')}, crop {spec.get('crop_pct')}"
                     + (", normalised in the graph" if spec.get("normalize_in_graph") else ""))
    return "; ".join(parts) or "nothing recorded"


def _same_model_inputs(a: Optional[Dict], b: Optional[Dict]) -> bool:
    keys = ("img_size", "crop_pct", "interpolation", "mean", "std", "normalize_in_graph")
    norm = lambda d: {k: (list(d[k]) if isinstance(d.get(k), (list, tuple)) else d.get(k)) for k in keys}  # noqa: E731
    return norm(a) == norm(b)


BatchRange = Optional[Tuple[int, int]]  # (min, max) an artifact accepts; None: not recorded, any batch


def parse_batch_range(text: Optional[str]) -> BatchRange:
    """``clustervig.batch`` metadata ("4" static, "1:8:32" dynamic) as (min, max); None when absent."""
    if not text:
        return None
    try:
        parts = [int(v) for v in str(text).split(":")]
    except ValueError:
        return None
    return (parts[0], parts[-1]) if len(parts) in (1, 3) else None


def describe_batches(r: Tuple[int, int]) -> str:
    return f"a static batch of {r[0]}" if r[0] == r[1] else f"batches {r[0]} to {r[1]}"


def common_batch(ranges: List[Tuple[Path, BatchRange]], batch: Optional[int]) -> int:
    """The batch every artifact accepts: ``batch`` if given (checked), else the smallest one all accept.
    Artifacts with no batch in common are refused with both named."""
    known = [(p, r) for p, r in ranges if r is not None]
    if batch is not None:
        for p, r in known:
            if not r[0] <= batch <= r[1]:
                raise click.ClickException(f"--batch {batch}: {p} takes {describe_batches(r)} only; give a --batch "
                                           f"it accepts{' (or leave --batch out)' if len(known) > 1 else ''}")
        return batch
    if not known:
        return 1
    low = max(known, key=lambda pr: pr[1][0])
    high = min(known, key=lambda pr: pr[1][1])
    if low[1][0] > high[1][1]:
        raise click.ClickException(
            f"{high[0]} takes {describe_batches(high[1])} and {low[0]} takes {describe_batches(low[1])}: no batch "
            "fits both; compare artifacts exported with the same --batch, or export one with a --dynamic-batch "
            "range that covers the other's")
    return low[1][0]


def run_compare(artifacts: List[Path], model: Optional[clustervig.ClusterViG], atol: float, rtol: float,
                inputs: str, batch: Optional[int], plugins_lib: Optional[Path] = None) -> bool:
    """Compare ``artifacts`` (and ``model``, first) on inputs preprocessed as the artifacts record.
    Artifacts of different models, preprocessing or input sizes, or a model that is not the one the
    artifacts were exported from, are refused with the difference named."""
    if len(artifacts) + (model is not None) < 2:
        raise click.UsageError("need at least two things to compare: several artifacts, or one with --checkpoint")
    runners: List[BaseRunner] = []
    recorded = []  # (path, spec or None, config, input size or None)
    batch_ranges: List[Tuple[Path, BatchRange]] = []
    names = _runner_names(artifacts)
    for p in artifacts:
        if p.suffix in (".plan", ".engine", ".trt"):
            try:
                meta = engine_metadata(p)
            except RuntimeErrorWithFix as exc:
                raise click.ClickException(str(exc)) from None
            size = None
            batch_ranges.append((p, parse_batch_range(meta.get("clustervig.batch"))))
            runner = lambda p=p: trt_runner(p, plugins_lib, names[p])  # noqa: E731
        else:
            try:
                g = onnx.load(str(p), load_external_data=False)
            except Exception as exc:
                raise click.ClickException(f"{p} is not a readable ONNX file ({type(exc).__name__}); re-export it") from None
            meta = get_metadata(g)
            dims = g.graph.input[0].type.tensor_type.shape.dim
            size = (dims[2].dim_value, dims[3].dim_value) if len(dims) == 4 and dims[2].dim_value else None
            if dims and dims[0].dim_value:  # a static batch is in the graph itself
                batch_ranges.append((p, (dims[0].dim_value, dims[0].dim_value)))
            else:
                batch_ranges.append((p, parse_batch_range(meta.get("clustervig.batch"))))
            runner = lambda p=p, g=g: onnx_runner(p, g, names[p])  # noqa: E731
        spec = json.loads(meta["clustervig.preprocess"]) if "clustervig.preprocess" in meta else None
        cfg = json.loads(meta.get("clustervig.config", "{}"))
        recorded.append((p, spec, cfg, size))
        runners.append(runner)
    # one model's artifacts only: same input size, same preprocessing, same model
    ref = next((r for r in recorded if r[1] is not None), None)
    for p, spec, cfg, size in recorded:
        first = recorded[0]
        if size and first[3] and size != first[3]:
            raise click.ClickException(f"{first[0]} takes {first[3][0]}x{first[3][1]} images and {p} takes "
                                       f"{size[0]}x{size[1]}: they are exports of different models; compare the "
                                       "artifacts of one export")
        if ref is not None and spec is not None and not _same_model_inputs(spec, ref[1]):
            raise click.ClickException(f"{ref[0]} and {p} record different preprocessing ({_describe(ref[1], ref[2])} vs "
                                       f"{_describe(spec, cfg)}): their outputs are not comparable on the same inputs; "
                                       "compare the artifacts of one export")
        if ref is not None and cfg and ref[2] and (cfg.get("name"), cfg.get("num_classes")) != \
                (ref[2].get("name"), ref[2].get("num_classes")):
            raise click.ClickException(f"{ref[0]} is {_describe(None, ref[2])} and {p} is {_describe(None, cfg)}: "
                                       "compare the artifacts of one export")
    spec = ref[1] if ref is not None else None
    if model is not None:
        mspec = {**transform_spec(model.cfg), "normalize_in_graph": bool(spec and spec.get("normalize_in_graph"))}
        art_cfg = ref[2] if ref is not None else {}
        mismatch = (spec is not None and not _same_model_inputs(mspec, spec)) or \
            (art_cfg and (art_cfg.get("name"), art_cfg.get("num_classes")) != (model.cfg.name, model.cfg.num_classes))
        sizes = {r[3] for r in recorded if r[3]}
        if sizes and sizes != {model.cfg.img_hw}:
            mismatch = True
        if mismatch:
            raise click.ClickException(
                f"the checkpoint is {_describe(mspec, {'name': model.cfg.name, 'num_classes': model.cfg.num_classes})}, "
                f"but {recorded[0][0]} was exported from {_describe(spec, art_cfg)}: give the checkpoint the artifacts "
                "were exported from")
        spec = spec or mspec
        runners.insert(0, lambda: TorchRunner(model, name="pytorch",
                                              normalize=(spec["mean"], spec["std"]) if spec.get("normalize_in_graph") else None))
    if spec is None:
        size = next((r[3] for r in recorded if r[3]), None)
        spec = {**IMAGENET_SPEC, "img_size": size[0] if size else 224}
        click.echo(f"note: no artifact records its preprocessing (not exported by cvig export): photographs are "
                   f"preprocessed the ImageNet way at {spec['img_size']} px", err=True)
    b = common_batch(batch_ranges, batch)
    try:
        results = Comparator.run([make() for make in runners], data_loader=feeds(spec, b, inputs))
    except PolygraphyException as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise click.ClickException(f"Polygraphy could not run the comparison at batch {b}: {first}") from None
    # every runner against the first (the reference), as Polygraphy's --load-outputs comparisons do; its default
    # (neighbouring pairs) would compare B with C, D with C, ... and blame the wrong artifact
    pairs = [(0, i) for i in range(1, len(results))]
    acc = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol), comparisons=pairs)
    ref_name = results[0][0]
    click.echo(f"reference: {ref_name} (batch {b}, {inputs}, atol {atol:g}, rtol {rtol:g})")
    for (_, other), iters in acc[0].items():  # one AccuracyResult per compare function: ours
        passed = sum(all(bool(v) for v in it.values()) for it in iters)
        verdict = "PASSED" if passed == len(iters) else "FAILED"
        click.echo(f"  {other} vs {ref_name}: {verdict} ({passed}/{len(iters)} batches within tolerance)")
    return bool(acc)


@click.command(context_settings=CTX, epilog="""
\b
Examples:
  cvig-compare out/model_fp32.onnx --checkpoint ck.pth          # PyTorch vs ONNX Runtime
  cvig-compare out/model_fp32.onnx out/model_fp16.onnx --atol 0.05 --rtol 0.05
  cvig-compare out/model_fp16.plan --checkpoint ck.pth          # needs TensorRT
  cvig-compare out/model_fp32.onnx out/model_plugins.onnx        # plugin graph on the host kernels
  cvig-compare out/model_fp32.onnx out/model_plugins.plan --plugins-lib build/plugins/libcvig_plugins.so

\b
Every artifact is compared with the first one given, the reference
(PyTorch when --checkpoint is given), as Polygraphy's --load-outputs
comparisons do: `cvig compare A B C` compares B with A and C with A, never
B with C, so a FAILED line names the artifact that differs from the
reference. Exit status 1 when any of them differs beyond --atol/--rtol.

\b
Inputs are preprocessed as the artifacts record (ONNX metadata, or
model_<precision>.json / preprocess.json beside an engine). Artifacts of
different models, input sizes or preprocessing, and a --checkpoint of
another model, are refused; so are artifacts with no batch size in common
(static batches 1 and 4): the batch is the one all accept (--batch, or
the smallest they share).
""")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Add the PyTorch static form (first runner, the reference) from this checkpoint.")
@click.option("--model", "model_name", type=MODEL_NAME, default=None,
              help=model_help("Variant for --checkpoint (default: recorded in the checkpoint, else in the ONNX metadata)."))
@click.option("--atol", type=click.FloatRange(min=0), default=DEFAULT_ATOL, help="Absolute tolerance per logit.")
@click.option("--rtol", type=click.FloatRange(min=0), default=DEFAULT_RTOL, help="Relative tolerance per logit.")
@click.option("--inputs", type=click.Choice(["photos", "random"]), default="photos",
              help="Real photographs (scikit-image) or random tensors.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch size; every artifact must accept it (default: the smallest batch all accept: a "
                   "static export's batch, else the smallest of the dynamic ranges).")
@click.option("--plugins-lib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="libcvig_plugins.so, for TensorRT engines of the plugin graph (default: the one `cvig "
                   "build-plugins` recorded; plugin graphs in ONNX need none: they run on the host kernels).")
def main(artifacts, checkpoint, model_name, atol, rtol, inputs, batch, plugins_lib):
    """Compare ClusterViG artifacts with the first one (the reference) and with PyTorch (Polygraphy
    Comparator). Exits non-zero when any artifact differs from the reference beyond the tolerances."""
    model = None
    if checkpoint is not None:
        existing_file(checkpoint, "checkpoint")
        shape = _recorded_shape(artifacts[0])  # a backbone export: the same size and outputs from the checkpoint
        try:
            if model_name is None and recorded_config(checkpoint) is None:
                # a plain state_dict: the variant the ONNX metadata records
                meta = get_metadata(onnx.load(str(artifacts[0]), load_external_data=False)) \
                    if artifacts[0].suffix == ".onnx" else engine_metadata(artifacts[0])
                cfg = json.loads(meta.get("clustervig.config", "{}"))
                if not cfg:
                    raise click.UsageError(f"checkpoint {checkpoint} records no model and {artifacts[0]} no config: "
                                           "give --model NAME")
                model = build_checked_model(cfg["name"], checkpoint, None if shape else cfg["num_classes"],
                                            gcn=cfg["gcn"], **shape)
            else:
                model = build_checked_model(model_name, checkpoint, **shape)
        except (CheckpointError, ValueError, RuntimeErrorWithFix) as exc:
            raise click.ClickException(str(exc)) from None
        model.eval()
    ok = run_compare(list(artifacts), model, atol, rtol, inputs, batch, plugins_lib)
    click.echo("PASSED" if ok else "FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
