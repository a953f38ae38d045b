"""cvig-export: checkpoint -> validated FP32/FP16 ONNX (and a TensorRT engine where TensorRT is installed)."""
from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import click
import numpy as np
import onnx
import torch

import clustervig
from clustervig.checkpoint import CheckpointError, read_checkpoint
from clustervig.checkpoint import build_model as build_checked_model
from clustervig.checkpoint import model_config
from clustervig.cliutil import CTX, MODEL_NAME, Terminated, check_output_dir, check_output_file, existing_file, \
    signals_deferred, terminate_as_interrupt
from clustervig.graph import kmeans_labels
from clustervig.preprocess import ImageError, load_image, sample_photographs, transform_spec
from clustervig.registry import get_config
from clustervig.utils import FolderBusy, calibrate_batchnorm, folder_lock, write_json_atomic

from .fp16 import DEFAULT_FP32_ISLANDS, FP16_HEADROOM, ISLAND_PIECES, FP16_SAFE_BOUND, convert_fp16, count_precision, float_tensor_ranges, \
    is_island, overflow_nodes
from .gates import DEFAULT_GATES, GateError, capacity_gates, check_gates, effective_gates, fmt_cosine, fmt_fraction, \
    fmt_threshold, parse_gates
from clustervig.calib import CalibrationDataError, calibration_files, file_batches, load_or_collect, quantize_qdq
from clustervig.calib.calibrate import images_fingerprint
from clustervig.calib.modelopt_backend import METHODS as MODELOPT_METHODS, ModelOptUnavailable, quantize_modelopt
from clustervig.calib.modelopt_backend import where as modelopt_where

from .plugin_graph import SurgeryError, to_plugin_graph
from .onnx_export import MIN_OPSET, BatchSpec, ExportError, atomic_save, check_model, export_onnx, get_metadata, set_metadata
from .triton import BACKENDS as TRITON_BACKENDS, write_triton_repo
from .trt_compat import check_tensorrt_ops, memory_summary
from .trt_build import TensorRTUnavailable, build_command_hint, build_engine, tensorrt_module
from .validate import in_graph_normalization, validate as run_validation  # `validate` is the --validate flag in main
from .validate_sets import LabelledSet, ValidateSetError, check_validate_set, load_validate_set, model_class_names

MIN_CALIB_SAMPLES = 8
# --capacity auto: the smallest capacity without overflow on the measured images, times this margin (unseen
# images may have a larger partition), rounded up and capped at N (docs/design.md section 3, "Capacity")
CAPACITY_AUTO_MARGIN = 1.25

EXAMPLES = """
\b
Examples:
  cvig-export --model cvig_ti --checkpoint ck.pth --fp16 -o out/
  cvig-export --model cvig_nano --fp16 -o out/                 # random weights (warned), a quick demo
  cvig-export --checkpoint clustervig/weights/cvig_digits.pth --dynamic-batch 1:32:256 --fp16 -o out/
  cvig-export --model cvig_b_hr --knn padded --capacity 200 --checkpoint b_hr.pth -o out/
  cvig-export --model cvig_b_hr --knn padded --capacity auto --checkpoint b_hr.pth -o out/   # P from the images
  cvig-export --checkpoint clustervig/weights/cvig_photos.pth --fp16 --validate-set photo-patches -o out/

\b
Writes into OUT: model_fp32.onnx, model_fp16.onnx (with --fp16), model_*.plan
(with TensorRT), report.json, and for runtimes without ONNX: preprocess.json,
labels.txt (class names; ImageNet-1k for 1000 classes) and model_*.json (the
ONNX metadata, read by cvig-run beside model_*.plan). Files appear only when
the whole export succeeded (they are staged in a temporary folder first) and
every artifact passed its validation gates; when a gate fails, nothing is
published, the command exits 1 and the artifacts and report.json are kept in
OUT/failed-<UTC time>/ for inspection. OUT's parent folder must exist. One
export at a time owns OUT (a lock file, OUT/.cvig-export.lock, removed at
the end): a second export into it is refused at once, naming the running
one's PID. The files of an earlier export there (those its report.json
lists) are replaced; any other file with a name this export writes
(model_fp32.onnx, preprocess.json, ...) is refused before any work unless
--force is given; other files are never touched.

\b
Validation gates (--gate KEY=VALUE, VALUE a number or 'off'; defaults):
  fp32.cosine=0.9999 fp32.top1=1     FP32 ONNX vs PyTorch
  fp16.cosine=0.9    fp16.top1=off   FP16 (ORT and per-op FP16 rounding) vs FP32
  int8.cosine=off    int8.top1=off   INT8 vs FP32
  plugins.cosine=0.9999 plugins.top1=1  plugin graph vs FP32
  fp32.accuracy_drop=0.005 fp16.accuracy_drop=0.01 int8.accuracy_drop=off
  plugins.accuracy_drop=0.005          on a --validate-set only (below)
  capacity.overflow=0.05             --knn padded with --capacity P below N: the
                                     share of (image, token, block) slots whose
                                     token overflows its partition, per input set
Every artifact must also give finite logits. cosine is the worst image's
logit cosine, top1 the top-1 agreement, on each input set. Without
--checkpoint (random weights) fp16 and int8 check finiteness only.

\b
Labelled validation (--validate-set): also run PyTorch and every artifact on
held-out images with known classes and record each one's top-1 accuracy in
report.json ("validation" -> "accuracy") and the summary, beside the usual
comparisons on that set. That set is gated by accuracy: an artifact's top-1
accuracy may fall at most accuracy_drop (a fraction) below its reference's
(FP32: PyTorch; FP16, INT8, plugins: FP32). SET is digits (scikit-learn's
held-out digits), photo-patches (clustervig.photo_data's held-out crops; both
drawn as the checkpoint's training recipe drew its split) or a folder
DIR/<class name or index>/<image>.
"""


def _step(i: int, n: int, text: str):
    click.echo(click.style(f"[{i}/{n}] ", fg="cyan") + text, err=True)
    return time.perf_counter()


def _done(t0: float, extra: str = "") -> float:
    dt = time.perf_counter() - t0
    click.echo(f"      done in {dt:.1f}s{(' - ' + extra) if extra else ''}", err=True)
    return dt


def build_model(model_name: Optional[str], checkpoint: Optional[Path], num_classes: Optional[int],
                overrides: Dict) -> clustervig.ClusterViG:
    try:
        return build_checked_model(model_name, checkpoint, num_classes, **overrides)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def validation_inputs(model, batch: BatchSpec, samples: int) -> Dict[str, torch.Tensor]:
    # a static-batch graph is validated b images at a time on the smallest multiple of b
    # holding `samples` images: batch 1 must not mean one validation image
    n = batch.opt * -(-samples // batch.opt) if not batch.dynamic else min(max(samples, batch.min), batch.max)
    photos = sample_photographs(transform_spec(model.cfg))
    reps = -(-n // len(photos))
    g = torch.Generator().manual_seed(0)
    return {"photos": photos.repeat(reps, 1, 1, 1)[:n], "random": torch.randn(n, 3, *model.cfg.img_hw, generator=g)}


def labelled_set(model, checkpoint: Optional[Path], spec: str, limit: int, bspec: BatchSpec) -> LabelledSet:
    """--validate-set's images for this model (the built-in splits as the checkpoint's recipe drew them)."""
    recipe = None
    if checkpoint is not None:
        try:
            recipe = read_checkpoint(checkpoint).get("recipe")
        except CheckpointError:
            recipe = None  # build_model read it already; a plain state_dict file has no recipe
    try:
        return load_validate_set(spec, model.cfg, recipe if isinstance(recipe, dict) else None, limit,
                                 1 if bspec.dynamic else bspec.opt)
    except ValidateSetError as exc:
        raise click.ClickException(str(exc)) from None


def validation_chunk(bspec: BatchSpec, target: int = 32) -> int:
    """Images per validation run: a multiple of a static batch; within a dynamic range."""
    if not bspec.dynamic:
        return bspec.opt * max(1, target // bspec.opt)
    return max(bspec.min, min(bspec.max, target))


class ValidationProgress:
    """One line per input set that takes long (more than 64 images): at each quarter of its runs."""

    def __init__(self) -> None:
        self.shown: Dict[str, int] = {}

    def __call__(self, set_name: str, done: int, total: int) -> None:
        if total <= 64 * 4:  # a set of up to 64 images through PyTorch + three graphs passes quickly
            return
        quarter = 4 * done // total
        if quarter > self.shown.get(set_name, 0):
            self.shown[set_name] = quarter
            click.echo(f"      {set_name}: {done}/{total} image runs (PyTorch + each artifact)", err=True)


def parse_islands(text: str) -> List[str]:
    """``--fp32-islands``: comma-separated DEGC pieces, or 'none'; a misspelt piece is an error (it would
    silently put that piece in FP16)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["none"]:
        return []
    bad = [p for p in parts if p not in ISLAND_PIECES]
    if bad:
        raise click.BadParameter(f"unknown piece{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; choose from "
                                 f"{','.join(ISLAND_PIECES)} (or 'none')", param_hint="--fp32-islands")
    return parts


@click.command(epilog=EXAMPLES, context_settings=CTX)
@click.option("--model", "model_name", type=MODEL_NAME, default=None,
              help="Variant to export. May be omitted when --checkpoint was saved by clustervig (it records its variant).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights (.pth). Absent: random weights, BN calibrated on sample photos - loudly warned.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier outputs (default: the variant's, or what the checkpoint records).")
@click.option("--seed", type=int, default=0, help="Seed of the random weights when there is no --checkpoint (reproducible demos and benchmarks).")
@click.option("--img-size", default=None, metavar="HxW", callback=lambda ctx, param, v: parse_img_size(v),
              help="Input size H x W (or one number for a square input; default: the variant's or the checkpoint's), "
                   "any multiple of the model's stride (16 for the paper's variants), e.g. 800x1344. A checkpoint "
                   "trained at another size is used with its position embedding resampled (bicubic).")
@click.option("--features", is_flag=True, default=False,
              help="Export a backbone: the graph returns the feature maps [B, C, H/s, W/s] after the blocks of "
                   "--out-indices (outputs block<i>), or the --feature-pyramid levels, instead of logits; every map "
                   "is validated against PyTorch.")
@click.option("--out-indices", default=None, metavar="I,J,...", callback=lambda ctx, param, v: parse_out_indices(v),
              help="With --features: the blocks whose maps are returned, increasing (negative: from the end; "
                   "default -1, the last), e.g. 3,7,11,15.")
@click.option("--feature-pyramid", is_flag=True, default=False,
              help="With --features: turn the one map of --out-indices into strides s/2, s, 2s, 4s (outputs p3..p6 "
                   "at stride 16; a transposed convolution that no checkpoint trains, and max pooling).")
@click.option("--gcn", type=click.Choice(["mr", "edge", "sage", "gin"]), default=None, help="Local update (default: the variant's).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Static batch size (default 1).")
@click.option("--dynamic-batch", default=None, metavar="MIN:OPT:MAX", help="Dynamic batch range, e.g. 1:8:32.")
@click.option("--fp16/--no-fp16", default=False, help="Also write an FP16 graph (FP16 compute, FP32 islands).")
@click.option("--fp16-io/--fp32-io", default=False, help="FP16 graph takes and returns float16.")
@click.option("--fp32-islands", default=",".join(DEFAULT_FP32_ISLANDS), callback=lambda ctx, param, v: parse_islands(v),
              help=f"DEGC pieces kept in FP32 in the FP16 graph: any of {','.join(ISLAND_PIECES)}, or 'none'.")
@click.option("--int8/--no-int8", default=False, help="Also write an INT8 Q/DQ graph calibrated on --calib-dir.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of calibration images (PNG/JPEG, searched recursively, sorted by path).")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "max"]), default="entropy",
              help="Activation range method (ONNX Runtime's calibrators; modelopt: max or entropy).")
@click.option("--int8-backend", type=click.Choice(["ort", "modelopt"]), default="ort",
              help="Who calibrates and places Q/DQ: ort = this package (ONNX Runtime's calibrators, docs/design.md "
                   "'INT8 placement'); modelopt = NVIDIA ModelOpt's ONNX PTQ, where it is importable or "
                   "$CVIG_MODELOPT_PYTHON names a python that has it (not installed with this package).")
@click.option("--calib-samples", type=int, default=64,
              help=f"Calibration images used: the first N of --calib-dir (at least {MIN_CALIB_SAMPLES}).")
@click.option("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET}).")
@click.option("--knn", type=click.Choice(["auto", "masked", "padded"]), default="auto",
              help="Static k-NN layout: masked N x N TopK, or padded partitions (auto: masked up to N = 1024).")
@click.option("--capacity", default=None, metavar="P|auto", callback=lambda ctx, param, v: parse_capacity(v),
              help="Padded layout only: partition capacity, an integer P in 1..N (default N: exact), or 'auto': the "
                   f"smallest P without overflow on the validation (and --calib-dir) images, times {CAPACITY_AUTO_MARGIN}, "
                   "rounded up, at most N.")
@click.option("--normalize-in-graph/--normalize-outside", default=False,
              help="Put (x - mean) / std in the graph (input is RGB in [0, 1]).")
@click.option("--simplify/--no-simplify", default=True,
              help="Fold constants and remove dead nodes (names kept; outputs bit-identical).")
@click.option("--plugins/--no-plugins", default=False,
              help="Also write model_plugins.onnx: k-means, k-NN and gather-max-rel of every DEGC as TensorRT plugin nodes.")
@click.option("--engine/--no-engine", default=True, help="Build TensorRT engines when tensorrt is importable.")
@click.option("--plugins-lib", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="libcvig_plugins.so: also build the plugin graph's engine (default: the one `cvig build-plugins` "
                   "recorded, if any).")
@click.option("--workspace", type=click.IntRange(min=1), default=2048, help="TensorRT workspace limit in MiB.")
@click.option("--tf32/--no-tf32", default=False,
              help="Let TensorRT run FP32 layers in TF32 (10-bit mantissa inputs); off keeps the FP32 islands FP32.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="TensorRT timing cache file (read and updated).")
@click.option("--triton-repo", type=click.Path(path_type=Path), default=None,
              help="Also write a Triton model repository: <model>_onnx (and <model>_trt when an engine is built), "
                   "or the models of --triton-backend.")
@click.option("--triton-backend", "triton_backends", multiple=True, type=click.Choice(list(TRITON_BACKENDS)),
              help="Model(s) of the Triton repository (repeatable): onnxruntime = <model>_onnx on Triton's ONNX Runtime "
                   "backend; python = <model>_python, ONNX Runtime inside Triton's Python backend (CPU servers "
                   "without the ONNX Runtime backend); tensorrt = <model>_trt, the engine (needs TensorRT here). "
                   "Default: onnxruntime, plus tensorrt when an engine is built.")
@click.option("--validate/--no-validate", default=True, help="Compare every artifact with PyTorch.")
@click.option("--samples", type=click.IntRange(min=1), default=4, help="Images per validation input set (dynamic batch).")
@click.option("--validate-set", "validate_set", default=None, metavar="SET|DIR",
              help="Also measure top-1 accuracy of PyTorch and every artifact on labelled held-out images: digits, "
                   "photo-patches, or a folder DIR/<class name or index>/<image>.")
@click.option("--validate-images", type=click.IntRange(min=0), default=256, show_default=True,
              help="Images of --validate-set used (0: all), the first in round-robin class order.")
@click.option("--gate", "gate_specs", multiple=True, metavar="KEY=VALUE",
              help="Override a validation gate, e.g. --gate fp16.cosine=0.98 or --gate fp16.top1=1 (repeatable; "
                   f"keys: {', '.join(DEFAULT_GATES)}).")
@click.option("--no-gates", "no_gates", is_flag=True, default=False,
              help="Expert: publish even when an artifact misses its validation gates (they are still reported).")
@click.option("-o", "--output", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder (its parent must exist; one export at a time). An earlier export there is replaced "
                   "as a whole; other files are left alone, and an export that would overwrite one is refused.")
@click.option("--force", is_flag=True, default=False,
              help="Replace files in the output folder that have the names this export writes (model_fp32.onnx, "
                   "preprocess.json, report.json, ...) although no earlier export's report.json lists them. "
                   "Files with other names are still left alone.")
def main(model_name, checkpoint, num_classes, seed, img_size, features, out_indices, feature_pyramid, gcn, batch,
         dynamic_batch, fp16, fp16_io, fp32_islands, int8, calib_dir,
         calib_method, int8_backend, calib_samples, opset, knn,
         capacity, normalize_in_graph, simplify, plugins, engine, plugins_lib, workspace, tf32, timing_cache, triton_repo,
         triton_backends, validate, samples, validate_set, validate_images, out, force, gate_specs, no_gates):
    """Export a ClusterViG checkpoint to ONNX (FP32, optionally FP16/INT8/plugin graph), validate every
    artifact against PyTorch, and build TensorRT engines where TensorRT is installed."""
    # every argument, input and output path is checked here, before any long work
    if batch is not None and dynamic_batch is not None:
        raise click.UsageError("use either --batch or --dynamic-batch, not both")
    try:
        bspec = BatchSpec.parse(dynamic_batch) if dynamic_batch else BatchSpec(batch or 1, batch or 1, batch or 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if opset < MIN_OPSET:
        raise click.ClickException(f"opset {opset} is too low: ClusterViG needs opset >= {MIN_OPSET} (e.g. --opset {MIN_OPSET})")
    if model_name is None and checkpoint is None:
        raise click.UsageError("give --model NAME, or --checkpoint of a file saved by clustervig (it records its model)")
    if checkpoint is not None:
        existing_file(checkpoint, "checkpoint")
    shape = check_model_shape(model_name, checkpoint, num_classes, img_size, features, out_indices, feature_pyramid,
                              gcn, knn, validate_set, triton_repo)
    if knn == "masked" and capacity is not None:
        raise click.UsageError(f"--capacity {capacity} applies to the padded k-NN layout; --knn masked has no partition "
                               "capacity (add --knn padded, or drop --capacity)")
    islands = fp32_islands
    if int8 and calib_dir is None:
        raise click.UsageError("--int8 needs --calib-dir DIR with calibration images")
    if int8 and int8_backend == "modelopt":
        if calib_method not in MODELOPT_METHODS:
            raise click.UsageError(f"--int8-backend modelopt calibrates with {' or '.join(MODELOPT_METHODS)}, "
                                   f"not --calib-method {calib_method}")
        try:
            modelopt_where()
        except ModelOptUnavailable as exc:
            raise click.ClickException(f"--int8-backend modelopt: {exc}") from None
    if calib_samples < (MIN_CALIB_SAMPLES if int8 else 1):
        raise click.UsageError(f"--calib-samples {calib_samples}: at least {MIN_CALIB_SAMPLES if int8 else 1} are needed")
    calib_files: Optional[List[Path]] = None
    if calib_dir is not None:
        try:
            calib_files = calibration_files(calib_dir, calib_samples, MIN_CALIB_SAMPLES if int8 else 1)
        except CalibrationDataError as exc:
            raise click.ClickException(str(exc)) from None
        if len(calib_files) < calib_samples:
            click.secho(f"note: {calib_dir} holds {len(calib_files)} images, fewer than --calib-samples {calib_samples}: "
                        f"calibrating on {len(calib_files)}", fg="yellow", err=True)
        check_calibration_images(calib_files)
    try:
        gate_overrides = parse_gates(gate_specs)
    except GateError as exc:
        raise click.BadParameter(str(exc), param_hint="--gate") from None
    if validate_set is None and click.get_current_context().get_parameter_source("validate_images") \
            == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--validate-images counts the images of --validate-set: add --validate-set SET|DIR")
    if validate_set is not None:
        if not validate:
            raise click.UsageError("--validate-set measures the artifacts on labelled images: drop --no-validate")
        try:
            check_validate_set(validate_set)
        except ValidateSetError as exc:
            raise click.BadParameter(str(exc), param_hint="--validate-set") from None
    check_output_parent(out, "-o/--output")
    check_output_dir(out, "-o/--output")
    check_output_parent(triton_repo, "--triton-repo")
    check_output_dir(triton_repo, "--triton-repo")
    check_output_file(timing_cache, "--timing-cache")
    if triton_repo is not None and _inside(Path(triton_repo), Path(out)) is not None:
        raise click.BadParameter(f"{triton_repo} is inside the output folder {out}; give the repository its own folder",
                                 param_hint="--triton-repo")
    check_triton_backends(triton_repo, triton_backends, engine)
    if plugins and engine and plugins_lib is None:
        from clustervig.plugins import locations

        plugins_lib = locations.plugin_library()  # what `cvig build-plugins` recorded on this machine, if anything
    planned = planned_files(fp16, int8, int8_backend, plugins, plugins_lib, engine)
    out = Path(out)
    state: Dict = {}  # what _export got to (size estimate, published): for a full disk's message
    try:
        with terminate_as_interrupt():
            # the folder is this export's from here to the end of its publication; a failed first export
            # leaves no empty folder behind (folder_lock removes the folder it created when it is empty)
            with folder_lock(out, LOCK_FILE):
                # read under the lock, before any work: a broken report.json, or another's files, are refused now
                earlier = earlier_export(out, force)
                replaced = check_foreign_files(out, planned, earlier, force)
                if no_gates:
                    click.secho("WARNING: --no-gates: artifacts are published even if they miss their validation gates "
                                "(failures are only printed and recorded in report.json).", fg="yellow", err=True)
                _export(model_name, checkpoint, num_classes, seed, gcn, bspec, fp16, fp16_io, islands, int8, calib_dir,
                        calib_files, calib_method, int8_backend, opset, knn, capacity, normalize_in_graph, simplify, plugins,
                        engine, plugins_lib, workspace, tf32, timing_cache, triton_repo, list(triton_backends) or None,
                        validate, samples, validate_set, validate_images, out, gate_overrides, no_gates, earlier, replaced,
                        state, shape=shape)
    except FolderBusy as exc:
        raise click.ClickException(
            f"{out}/ is in use by another cvig export (PID {exc.pid if exc.pid is not None else 'unknown'}), which owns it "
            "until it has finished: wait for it to finish, or choose another output folder") from None
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        click.secho(f"{'terminated' if term else 'interrupted'}: nothing was published, {out}/ is as it was",
                    fg="yellow", err=True)
        raise SystemExit(143 if term else 130) from None
    except click.ClickException:
        raise
    except Exception as exc:  # a full disk, wherever it struck (ENOSPC may arrive wrapped): one line, not a traceback
        full = _disk_full(exc)
        if full is None:
            raise
        raise click.ClickException(disk_full_message(full, out, state.get("estimate"), state.get("published", False))) from None


LOCK_FILE = ".cvig-export.lock"  # inside OUT while an export owns it; never published, removed at the end


def check_output_parent(out: Optional[Path], option: str) -> None:
    """The output folder may be created, its parent not (as ``cvig run -o``: a typo in a path is not a tree
    of new folders)."""
    if out is None:
        return
    out = Path(out)
    parent = out.absolute().parent
    if not out.exists() and not parent.exists():  # a parent that is a file: check_output_dir says so
        raise click.BadParameter(f"folder {out.parent} does not exist; create it first or choose another path",
                                 param_hint=option)


def check_calibration_images(files: List[Path]) -> None:
    """Decode every calibration image now, before any work (they are read again, preprocessed, when the model's
    input size is known): a damaged or foreign file fails at once, not after the FP32 export."""
    for f in files:
        try:
            load_image(f).close()
        except ImageError as exc:
            raise click.ClickException(f"calibration image unusable: {exc}") from None


def planned_files(fp16: bool, int8: bool, int8_backend: str, plugins: bool, plugins_lib: Optional[Path],
                  engine: bool) -> List[str]:
    """Every name this export may write into OUT, known before any work: report.json, preprocess.json,
    labels.txt, model_<precision>.onnx/.json (and .plan where TensorRT will build it), the calibration cache."""
    arts = ["fp32"] + ["fp16"] * fp16 + ["int8"] * int8 + ["plugins"] * plugins
    names = [REPORT, "preprocess.json", "labels.txt"] + [f"model_{a}{ext}" for a in arts for ext in (".onnx", ".json")]
    if int8 and int8_backend == "ort":
        names.append(CALIB_CACHE)
    if engine:
        try:
            tensorrt_module()
            names += [f"model_{a}.plan" for a in arts if a != "plugins" or plugins_lib is not None]
        except TensorRTUnavailable:
            pass  # no engines are built here
    return sorted(names)


def check_foreign_files(out: Path, planned: List[str], earlier: Optional[Dict], force: bool) -> List[str]:
    """The files in ``out`` this export would replace although no earlier export owns them (no report.json of
    cvig export there lists them): refused, before any work, unless ``force``; returns them (to replace)."""
    owned = set((earlier or {}).get("files", []))
    foreign = [n for n in planned if n not in owned and os.path.lexists(out / n)]
    if foreign and not force:
        why = (f"which the earlier export's {REPORT} there does not list" if earlier is not None
               else f"and no {REPORT} of an earlier cvig export lists them")
        raise click.ClickException(
            f"{out}/ holds {', '.join(foreign)}, {why}: this export would replace {'them' if len(foreign) > 1 else 'it'}; "
            "choose another output folder, or add --force to replace them")
    return foreign


def _disk_full(exc: BaseException) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError behind ``exc`` (itself, its cause or context), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def export_size_estimate(model, fp16: bool, int8: bool, plugins: bool) -> int:
    """About the bytes the ONNX artifacts take: each holds the weights (FP32: 4 bytes a number, FP16: 2; the
    INT8 and plugin graphs counted as FP32) and a graph of up to about a MiB; report and sidecars are small."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())
    return int(weights * (1 + 0.5 * fp16 + int8 + plugins)) + 2**20 * (2 + fp16 + int8 + plugins)


def disk_full_message(exc: OSError, out: Path, need: Optional[int], published: bool = False) -> str:
    """One line for a full disk: where, how much is free there now (the staged files are gone) and about how
    much the export needs (:func:`export_size_estimate`, once the model is built); ``published``: it struck
    after the export's files were in place (updating report.json for the Triton repository)."""
    where = Path(exc.filename).parent if exc.filename else out
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = _mib(shutil.disk_usage(where).free)
    except OSError:
        free = "unknown"
    needed = f", the export needs about {_mib(need)}" if need else ""
    done = (f"the export is published in {out}/ but {exc.filename or 'a file'} could not be written" if published
            else f"nothing was published, {out}/ is as it was")
    return (f"no space left on the device of {where}/ ({free} free{needed}): {done}; "
            "free some space there or choose a folder on another disk (-o)")


def check_triton_backends(triton_repo: Optional[Path], backends, engine: bool) -> None:
    """--triton-backend needs --triton-repo; tensorrt needs an engine, so TensorRT here and --engine."""
    if not backends:
        return
    if triton_repo is None:
        raise click.UsageError("--triton-backend chooses the models of a Triton repository: add --triton-repo DIR")
    if "tensorrt" not in backends:
        return
    if not engine:
        raise click.UsageError("--triton-backend tensorrt serves the TensorRT engine: drop --no-engine")
    try:
        tensorrt_module()
    except TensorRTUnavailable as exc:
        raise click.ClickException(
            f"--triton-backend tensorrt serves the TensorRT engine, and {exc}: export with --triton-backend "
            "onnxruntime (or python) here, or run cvig export where TensorRT is installed") from None


def _inside(path: Path, folder: Path) -> Optional[Path]:
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def _export(model_name, checkpoint, num_classes, seed, gcn, bspec, fp16, fp16_io, islands, int8, calib_dir, calib_files,
            calib_method, int8_backend, opset, knn, capacity, normalize_in_graph, simplify, plugins, engine, plugins_lib, workspace, tf32,
            timing_cache, triton_repo, triton_backends, validate, samples, validate_set, validate_images, out: Path, gate_overrides, no_gates,
            earlier, replaced: List[str], state: Dict, shape: Optional[Dict] = None) -> None:
    n_steps = 3 + int(fp16) + int(validate) + int(plugins) + int(int8)
    step = 0
    timings: Dict[str, float] = {}
    overrides = {k: v for k, v in dict(gcn=gcn, knn=knn, capacity=capacity if capacity != "auto" else None).items()
                 if v is not None}
    overrides.update(shape or {})  # img_size and a backbone's outputs (check_model_shape)

    step += 1
    t = _step(step, n_steps, f"building {model_name or 'model from checkpoint'}" + (f" from {checkpoint}" if checkpoint else ""))
    torch.manual_seed(seed)
    model = build_model(model_name, checkpoint, num_classes, overrides).eval()
    inputs = validation_inputs(model, bspec, samples)
    if checkpoint is None:
        click.secho("WARNING: no --checkpoint: exporting RANDOM weights (BatchNorm statistics calibrated on sample "
                    "photographs so the numbers are meaningful). Do not deploy this model.", fg="yellow", err=True)
        # all sample photographs, whatever the batch: statistics of a single image
        # zero the head's BatchNorm (one pooled vector has no variance) and the logits with it
        with masked_when_exact(model):
            calibrate_batchnorm(model, [sample_photographs(transform_spec(model.cfg))])
    if model.load_notes.get("untrained"):
        click.secho(f"note: {', '.join(model.load_notes['untrained'])} (the feature pyramid's transposed convolution) "
                    "are not in the checkpoint: they keep their initialisation, untrained until a detector trains "
                    "them", fg="yellow", err=True)
    if "pos_embed_resampled" in model.load_notes:
        r = model.load_notes["pos_embed_resampled"]
        click.echo(f"      position embedding resampled from the checkpoint's {r['from_grid'][0]}x{r['from_grid'][1]} "
                   f"token grid to {r['to_grid'][0]}x{r['to_grid'][1]} (bicubic)", err=True)
    spec = transform_spec(model.cfg)
    state["estimate"] = export_size_estimate(model, fp16, int8, plugins)
    capacity_info = resolve_capacity(model, capacity, inputs, calib_files)
    described = describe_model(model.cfg)  # after the capacity: auto's P is part of the config
    gates = effective_gates(gate_overrides, random_weights=checkpoint is None)
    capacity_results = capacity_gates(capacity_info, gates)
    failed_capacity = [r["reason"] for r in capacity_results if not r["passed"]]
    if failed_capacity and validate and not no_gates:  # known before any export work: fail now
        for line in failed_capacity:
            click.secho(f"GATE FAILED {line}", fg="red", err=True)
        raise click.ClickException(
            f"--capacity {capacity_info['capacity']} overflows too many tokens (gate capacity.overflow <= "
            f"{fmt_threshold(gates['capacity.overflow']['threshold'], True)}): nothing was exported to {out}/; give a larger --capacity "
            f"(the largest partition measured is {capacity_info['largest_partition']}) or auto, or change the gate "
            "(--gate capacity.overflow=VALUE, or --no-gates)")
    labelled = labelled_set(model, checkpoint, validate_set, validate_images, bspec) if validate_set else None
    timings["build_model"] = _done(t, f"{described['label']}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params"
                                      + (f"; --validate-set {labelled.name}: {len(labelled.labels)} of {labelled.available} "
                                         "labelled images" if labelled else ""))

    out.mkdir(exist_ok=True)  # folder_lock made it; the parent was checked
    stage = Path(tempfile.mkdtemp(prefix=".cvig-export-", dir=out))
    try:
        step += 1
        t = _step(step, n_steps, f"exporting FP32 ONNX (opset {opset}, batch {bspec})")
        fp32_path = stage / "model_fp32.onnx"
        try:
            fp32 = export_onnx(model, fp32_path, bspec, opset, normalize_in_graph, simplify=simplify)
        except ExportError as exc:
            raise click.ClickException(str(exc)) from None
        timings["export_fp32"] = _done(t, f"{len(fp32.graph.node)} nodes")
        artifacts = {"fp32": fp32_path}
        precision = {}
        if fp16:
            step += 1
            t = _step(step, n_steps, f"converting to FP16 (FP32 islands: {', '.join(islands) or 'none'})")
            g32 = onnx.load(str(fp32_path))
            range_analysis = fp16_range_analysis(g32, inputs, islands, calib_files, spec)
            kept = [k["node"] for k in range_analysis["kept_fp32"]]
            g16 = convert_fp16(g32, islands, fp16_io, keep_fp32=kept)
            set_metadata(g16, {"clustervig.precision": "fp16", "clustervig.fp32_islands": ",".join(islands),
                               "clustervig.io": "fp16" if fp16_io else "fp32",
                               "clustervig.fp32_kept_by_range": str(len(kept))})
            check_model(g16)
            atomic_save(g16, stage / "model_fp16.onnx")
            artifacts["fp16"] = stage / "model_fp16.onnx"
            precision = count_precision(g16)
            timings["export_fp16"] = _done(t, f"{len(g16.graph.node)} nodes; Conv FP16 {precision['Conv']['fp16']}, "
                                              f"MatMul FP16 {precision['MatMul']['fp16']} / FP32 {precision['MatMul']['fp32']}; "
                                              f"{len(kept)} more nodes kept FP32 by range analysis "
                                              f"(max |x| outside the islands {range_analysis['max_abs_outside_islands']:.3g})")
        calibration = None
        if int8:
            step += 1
            t = _step(step, n_steps, f"INT8 Q/DQ graph ({calib_method} calibration on {len(calib_files)} images of {calib_dir}"
                                     f"{', ModelOpt' if int8_backend == 'modelopt' else ''})")
            g32 = onnx.load(str(fp32_path))
            if int8_backend == "modelopt":
                try:
                    images = np.concatenate(list(file_batches(calib_files, spec, 8)))
                    quantize_modelopt(fp32_path, images, calib_method, stage / "model_int8.onnx")
                except CalibrationDataError as exc:
                    raise click.ClickException(str(exc)) from None
                except (ModelOptUnavailable, RuntimeError) as exc:
                    raise click.ClickException(f"--int8-backend modelopt: {exc}") from None
                g8 = onnx.load(str(stage / "model_int8.onnx"))
                cal = {"cached": False, "key": {"images": images_fingerprint(calib_files)}, "ranges": None}
                summary_line = f"{sum(n.op_type == 'QuantizeLinear' for n in g8.graph.node)} Q/DQ pairs by ModelOpt"
            else:
                try:
                    cal = load_or_collect(g32, lambda: file_batches(calib_files, spec, 8), calib_method, calib_files,
                                          out / CALIB_CACHE, write_to=stage / CALIB_CACHE)
                except CalibrationDataError as exc:
                    raise click.ClickException(str(exc)) from None
                g8 = quantize_qdq(g32, cal["ranges"])
                summary_line = (f"{len(cal['ranges'])} activation ranges"
                                f"{' (from cache: same graph, method and images)' if cal['cached'] else ''}")
            set_metadata(g8, {"clustervig.precision": "int8", "clustervig.calibration": calib_method,
                              "clustervig.int8_backend": int8_backend})
            check_model(g8)
            atomic_save(g8, stage / "model_int8.onnx")
            artifacts["int8"] = stage / "model_int8.onnx"
            calibration = {"method": calib_method, "backend": int8_backend, "folder": str(Path(calib_dir).resolve()),
                           "images": len(calib_files), "images_sha256": cal["key"]["images"], "from_cache": cal["cached"]}
            timings["export_int8"] = _done(t, summary_line)
        if plugins:
            step += 1
            t = _step(step, n_steps, "plugin graph (graph surgery by stable names)")
            try:
                pg, surgery = to_plugin_graph(onnx.load(str(fp32_path)))
            except SurgeryError as exc:
                raise click.ClickException(str(exc)) from None
            onnx.checker.check_model(pg, full_check=True)
            atomic_save(pg, stage / "model_plugins.onnx")
            artifacts["plugins"] = stage / "model_plugins.onnx"
            timings["plugins"] = _done(t, surgery.line())
        # paths: files in the report's own folder by name (relative to it: the folder can be moved), every
        # other path absolute (the report does not depend on the working directory it was written from)
        report: Dict = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": tool_versions(),
            "model": described["model"],
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "random_weights": checkpoint is None,
            "seed": seed if checkpoint is None else None,
            "batch": str(bspec),
            "opset": opset,
            "fp32_islands": islands if fp16 else None,
            "fp16_range_analysis": range_analysis if fp16 else None,
            "capacity": capacity_info,
            "calibration": calibration,
            "plugins": {"replaced": surgery.replaced, "nodes_before": surgery.nodes_before,
                        "nodes_after": surgery.nodes_after} if plugins else None,
            "artifacts": {},
            "timings_s": timings,
        }
        if model.cfg.features_only:  # a backbone: its maps, and what loading the checkpoint resampled or left untrained
            report["outputs"] = model.cfg.feature_outputs()
        if model.load_notes:
            report["checkpoint_notes"] = model.load_notes
        if validate:
            step += 1
            sets = dict(inputs)
            if labelled is not None:  # validation only: range analysis and capacity never see the held-out images
                sets[labelled.name] = labelled.images
            t = _step(step, n_steps, "validating against the PyTorch static form (" + " + ".join(
                [f"{k} {len(v)}" for k, v in sets.items()]) + " images)")
            report["validation"] = run_validation(model, artifacts, sets, chunk=validation_chunk(bspec),
                                                  labels={labelled.name: labelled.labels} if labelled else None,
                                                  progress=ValidationProgress())
            if labelled is not None:
                report["validation"]["labelled_set"] = labelled.describe()
            timings["validate"] = _done(t)
            results = check_gates(report["validation"], gates) + capacity_results
            report["gates"] = {"enforced": not no_gates, "thresholds": gates, "results": results,
                               "failed": [r["reason"] for r in results if not r["passed"]]}
        else:
            report["gates"] = {"enforced": False, "why": "--no-validate: nothing was compared", "failed": []}
        if report["gates"]["failed"] and not no_gates:
            with signals_deferred():
                failed_dir = _keep_failed(stage, out, report, artifacts, precision)
            click.echo(summary_table(report), err=False)
            for line in report["gates"]["failed"]:
                click.secho(f"GATE FAILED {line}", fg="red", err=True)
            raise click.ClickException(
                f"{len(report['gates']['failed'])} validation gate(s) failed: nothing published in {out}/; the artifacts "
                f"and report.json are in {failed_dir}/ (--gate KEY=VALUE changes a threshold, --no-gates publishes anyway)")
        step += 1
        t = _step(step, n_steps, "TensorRT engines")
        engines = {}
        if engine:
            for name, path in artifacts.items():
                if name == "plugins" and plugins_lib is None:
                    continue  # needs libcvig_plugins.so (--plugins-lib); the printed trtexec line names it
                plan = stage / f"model_{name}.plan"
                try:
                    build_engine(path, plan, bspec, model.cfg.img_size, workspace, timing_cache, tf32=tf32,
                                 plugin_library=plugins_lib if name == "plugins" else None)
                    engines[name] = plan
                    report["versions"]["tensorrt"] = getattr(tensorrt_module(), "__version__", "unknown")
                except TensorRTUnavailable:
                    hints = [build_command_hint(out / p.name, out / f"model_{n}.plan", bspec, model.cfg.img_size, tf32,
                                                (plugins_lib or "build/plugins/libcvig_plugins.so") if n == "plugins" else None)
                             for n, p in artifacts.items()]
                    click.echo(f"      TensorRT is not installed here: the ONNX artifacts are ready in {out}/. "
                               "Where TensorRT is installed, cvig-export builds the engines itself; or run:\n        "
                               + "\n        ".join(hints), err=True)
                    break
        else:
            click.echo("      skipped (--no-engine)", err=True)
        timings["engines"] = _done(t)
        # one read of each staged ONNX file serves its report entry and its sidecar metadata
        staged = {**artifacts, **{f"{k}_engine": v for k, v in engines.items()}}
        metas = {}
        for name, path in staged.items():
            entry = {"path": path.name, "bytes": path.stat().st_size}
            if path.suffix == ".onnx":
                g = onnx.load(str(path), load_external_data=False)
                metas[name] = get_metadata(g)
                entry["nodes"] = len(g.graph.node)
                entry["op_counts"] = _op_counts(g)
                findings = check_tensorrt_ops(g)  # one shape inference for errors and warnings
                entry["tensorrt_op_issues"] = [f.line() for f in findings if f.severity == "error"]
                entry["tensorrt_op_warnings"] = [f.line() for f in findings if f.severity == "warning"]
                for line in entry["tensorrt_op_issues"]:
                    click.secho(f"WARNING: {path.name}: TensorRT will reject {line}", fg="yellow", err=True)
                for line in entry["tensorrt_op_warnings"]:
                    click.secho(f"note: {path.name}: {line}", fg="yellow", err=True)
                if model.cfg.features_only:  # high-resolution graphs: what an engine has to hold (tensorrt.md s. 9)
                    entry["tensorrt_memory"] = memory_summary(g)
            report["artifacts"][name] = entry
        if precision:
            report["artifacts"]["fp16"]["precision_of_compute_ops"] = precision
        names = None if model.cfg.features_only else _class_names(model.cfg)  # a backbone has no classes
        sidecars = write_sidecars(stage, names, metas)
        if triton_repo is not None:
            report["triton_repo"] = {"path": str(Path(triton_repo).resolve()), "models": []}
        files = [p.name for p in sidecars] + [p.name for p in staged.values()] + [REPORT]
        if calibration is not None and (stage / CALIB_CACHE).is_file():  # ModelOpt keeps no cache
            files.append(CALIB_CACHE)
        report["sidecars"] = [p.name for p in sidecars]
        report["files"] = sorted(files)
        report["published"] = True
        write_json_atomic(stage / REPORT, report)
        # publish: everything or nothing, never cut in half by Ctrl-C or SIGTERM
        with signals_deferred():
            removed = publish(stage, out, files, earlier)
            state["published"] = True
            if triton_repo is not None:
                src = out / (staged.get("fp16") or staged["fp32"]).name
                eng = engines.get("fp16", engines.get("fp32"))
                try:
                    written = write_triton_repo(triton_repo, model.cfg.name, src, bspec, model.cfg.img_size,
                                                model.cfg.num_classes, engine_path=out / eng.name if eng else None,
                                                input_dtype="float16" if (fp16 and fp16_io) else "float32", labels=names,
                                                backends=triton_backends)
                except (OSError, ValueError) as exc:  # ValueError: --triton-backend tensorrt, no engine was built
                    raise click.ClickException(f"the export is published in {out}/, but the Triton repository "
                                               f"{triton_repo} could not be written: {exc}") from None
                report["triton_repo"]["models"] = sorted(written)
                write_json_atomic(out / REPORT, report)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if removed:
        click.echo(f"replaced the earlier export in {out}/: removed its {', '.join(removed)}", err=True)
    forced = [n for n in replaced if n in files]
    if forced:
        click.secho(f"--force: replaced {', '.join(forced)} in {out}/ (no earlier export listed them)", fg="yellow", err=True)
    if triton_repo is not None:
        click.echo(f"Triton repository: {triton_repo} ({', '.join(report['triton_repo']['models'])})", err=True)
    click.echo(summary_table(report), err=False)
    for line in report["gates"]["failed"]:  # only with --no-gates
        click.secho(f"WARNING: gate failed (--no-gates: published anyway): {line}", fg="yellow", err=True)
    click.echo(f"report: {out / REPORT}")


REPORT = "report.json"
CALIB_CACHE = "calibration_cache.json"


def earlier_export(out: Path, force: bool = False) -> Optional[Dict]:
    """What an earlier export in ``out`` owns, from its report.json: {"model": name, "files": [names]}.
    None when ``out`` holds no export. A report.json that is not an export's is an error (the folder is
    someone else's), unless ``force`` (it is then one more file this export replaces)."""
    rp = Path(out) / REPORT
    if not rp.is_file():
        return None
    try:
        rep = json.loads(rp.read_text())
        if not isinstance(rep, dict) or "artifacts" not in rep:
            raise ValueError
    except (ValueError, OSError):
        if force:
            return None
        raise click.BadParameter(f"{out} holds a {REPORT} that cvig export did not write; choose another output folder "
                                 "(or add --force to replace it)", param_hint="-o/--output") from None
    files = rep.get("files")
    if files is None:  # reports of earlier versions: the artifacts, the sidecars, the cache
        files = [Path(a["path"]).name for a in rep["artifacts"].values()] + list(rep.get("sidecars", [])) + [REPORT]
        if rep.get("artifacts", {}).get("int8") is not None:
            files.append(CALIB_CACHE)
    own = sorted({f for f in files if isinstance(f, str) and f and "/" not in f and f not in (".", "..")})
    return {"model": (rep.get("model") or {}).get("name"), "files": own}


def publish(stage: Path, out: Path, files: List[str], earlier: Optional[Dict]) -> List[str]:
    """Move the staged ``files`` into ``out`` and remove the files the earlier export there owned that
    this one does not write (its INT8 model, its labels, ...). Files it did not own are never touched."""
    for name in files:
        if name != REPORT:
            os.replace(stage / name, out / name)
    removed = []
    for name in (earlier or {}).get("files", []):
        if name not in files and (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    os.replace(stage / REPORT, out / REPORT)  # last: report.json appears only with the whole set
    return removed


def parse_img_size(text: Optional[str]):
    """``--img-size``: ``HxW`` (e.g. 800x1344) or one number for a square input; None keeps the model's."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        dims = [int(v) for v in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise click.BadParameter(f"{text!r} is not a size: give HxW in pixels, e.g. 800x1344, or one number for a "
                                 "square input", param_hint="--img-size")
    return dims[0] if len(dims) == 1 else (dims[0], dims[1])


def parse_out_indices(text: Optional[str]):
    """``--out-indices``: comma-separated block indices (negative from the end)."""
    if text is None:
        return None
    try:
        idx = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        idx = ()
    if not idx:
        raise click.BadParameter(f"{text!r}: give comma-separated block indices, e.g. 3,7,11,15 (or -1 for the last)",
                                 param_hint="--out-indices")
    return idx


def check_model_shape(model_name, checkpoint, num_classes, img_size, features: bool, out_indices, feature_pyramid: bool,
                      gcn, knn, validate_set, triton_repo) -> Dict:
    """The ``create_model`` options of --img-size / --features / --out-indices / --feature-pyramid, checked
    against the model (from --model, or the config the checkpoint records) before any work: a size the stem's
    stride does not divide, a grid too small for the clusters, or blocks the model does not have are one line
    each. Returns the options."""
    if not features:
        for flag, given in (("--out-indices", out_indices is not None), ("--feature-pyramid", feature_pyramid)):
            if given:
                raise click.UsageError(f"{flag} chooses a backbone's outputs: add --features")
    else:
        if num_classes is not None:
            raise click.UsageError("--num-classes sizes a classifier head, and a --features export has none: drop "
                                   "--num-classes")
        if validate_set is not None:
            raise click.UsageError("--validate-set measures top-1 accuracy, and a --features export returns feature "
                                   "maps, not classes: drop --validate-set (every map is compared with PyTorch)")
        if triton_repo is not None:
            raise click.UsageError("--triton-repo writes a classifier's model repository (output logits); a --features "
                                   "export has other outputs: drop --triton-repo")
    shape: Dict = {}
    if img_size is not None:
        shape["img_size"] = img_size
    if features:
        shape.update(features_only=True, feature_pyramid=feature_pyramid)
        if out_indices is not None:
            shape["out_indices"] = out_indices
    if shape and (model_name is not None or checkpoint is not None):
        extra = {k: v for k, v in dict(gcn=gcn, knn=knn).items() if v is not None}
        try:
            model_config(model_name, checkpoint, num_classes, **extra, **shape)
        except (CheckpointError, ValueError) as exc:
            hint = "--img-size" if "img_size" in str(exc) or "token grid" in str(exc) else (
                "--out-indices" if "out_indices" in str(exc) else "--feature-pyramid" if "pyramid" in str(exc) else None)
            raise click.BadParameter(str(exc), param_hint=hint) from None
    return shape


def parse_capacity(text: Optional[str]):
    """``--capacity``: None (P = N), ``"auto"``, or an integer >= 1 (the upper bound N is checked on the model)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        p = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an integer capacity nor 'auto'", param_hint="--capacity") from None
    if p < 1:
        raise click.BadParameter(f"{p} must be >= 1 (a partition holds at least one token)", param_hint="--capacity")
    return p


def _partition_batches(images: torch.Tensor, batch: int = 8):
    return [images[i:i + batch] for i in range(0, len(images), batch)]


@contextlib.contextmanager
def masked_when_exact(model):
    """Run ``model`` with the masked k-NN layout while its padded layout has capacity P >= N: both are exact
    (the same labels and neighbours, docs/design.md section 3), and masked computes N^2 similarities, not
    kappa N^2 (N = 4200 at 800 x 1344). The model's layout is restored afterwards."""
    knn_before = model.cfg.knn
    exact_padded = model.cfg.knn_mode == "padded" and (model.cfg.capacity or model.cfg.tokens) >= model.cfg.tokens
    if exact_padded:
        model.set_form("static", knn="masked")
    try:
        yield model
    finally:
        if exact_padded:
            model.set_form("static", knn=knn_before)


def measure_partitions(model, images: torch.Tensor, capacity: Optional[int] = None) -> Dict:
    """Largest partition (tokens sharing a k-means label in one image, any block) and the overflow tokens
    (all images; in all, and per block) of ``model`` on ``images`` with the padded layout at ``capacity``
    (None: N). At P = N the masked layout runs instead: the same labels and neighbours (both are exact,
    docs/design.md section 3) for N^2 similarities instead of kappa N^2 (N = 4200 at 800 x 1344)."""
    n = model.cfg.tokens
    exact = capacity is None or capacity >= n
    knn_before = model.cfg.knn
    model.set_form("static", knn="padded", capacity=capacity or n)
    largest = [0]

    def hook(mod, args, out):
        labels = kmeans_labels(out)  # numerics="authors": (labels, centroids)
        sizes = (labels.unsqueeze(-1) == torch.arange(mod.clusters, device=labels.device)).sum(1)
        largest[0] = max(largest[0], int(sizes.max()))

    degcs = list(model.degc_modules())
    hooks = [d.kmeans.register_forward_hook(hook) for d in degcs]
    per_block = [0] * len(degcs)
    try:
        with torch.no_grad(), masked_when_exact(model):
            for x in _partition_batches(images):
                model(x)
                for i, d in enumerate(degcs):
                    per_block[i] += 0 if exact else d.knn.last_overflow
    finally:
        for h in hooks:
            h.remove()
        model.set_form("static", knn=knn_before)
    return {"largest_partition": largest[0], "overflow_tokens": sum(per_block), "overflow_per_block": per_block}


def capacity_sets(model, inputs: Dict[str, torch.Tensor], calib_files: Optional[List[Path]]) -> Dict[str, torch.Tensor]:
    """The images a capacity is chosen and checked on: the validation sets ("photos", "random") and the
    --calib-dir images (never the held-out --validate-set)."""
    sets = dict(inputs)
    if calib_files:
        try:
            sets["calibration"] = torch.cat([torch.from_numpy(b) for b in file_batches(calib_files, transform_spec(model.cfg))])
        except CalibrationDataError as exc:
            raise click.ClickException(str(exc)) from None
    return sets


def overflow_entry(model, x: torch.Tensor, capacity: int, largest: int) -> Dict:
    """report.json ``capacity.sets[<set>]`` at ``capacity``: the overflow tokens in all and per block, and
    their share of the (image, token, block) slots."""
    m = measure_partitions(model, x, capacity)
    slots = len(x) * model.cfg.tokens * len(m["overflow_per_block"])
    return {"images": len(x), "largest_partition": largest, "overflow_at_capacity": m["overflow_tokens"],
            "overflow_at_capacity_per_block": m["overflow_per_block"], "slots": slots,
            "overflow_fraction": m["overflow_tokens"] / slots}


def resolve_capacity(model, capacity, inputs: Dict[str, torch.Tensor], calib_files: Optional[List[Path]]) -> Optional[Dict]:
    """Check ``--capacity`` against the model, pick P for ``auto``, measure the overflow at P on the validation
    (and calibration) images, per set and per block, and return the report.json entry."""
    n = model.cfg.tokens
    padded = model.cfg.knn_mode == "padded"
    if capacity is None:
        return {"mode": "exact", "capacity": n, "tokens": n} if padded else None
    if not padded:
        raise click.UsageError(f"--capacity {capacity} applies to the padded k-NN layout, and {model.cfg.name} "
                               f"(N = {n} tokens) uses the masked one with --knn {model.cfg.knn}; add --knn padded")
    if capacity != "auto" and capacity > n:
        raise click.UsageError(f"--capacity {capacity} is above N = {n} tokens of {model.cfg.name} "
                               f"(P = N is already exact): give 1..{n} or auto")
    sets = capacity_sets(model, inputs, calib_files)
    exact = {name: measure_partitions(model, x)["largest_partition"] for name, x in sets.items()}
    need = max(exact.values())  # smallest P without overflow on every set
    chosen = min(n, math.ceil(CAPACITY_AUTO_MARGIN * need)) if capacity == "auto" else capacity
    per_set = {name: overflow_entry(model, x, chosen, exact[name]) for name, x in sets.items()}
    if capacity == "auto":
        for name, x in sets.items():
            per_set[name]["overflow_at_largest_partition"] = measure_partitions(model, x, need)["overflow_tokens"]
            if need > 1:  # one below the measured maximum: the set that holds it overflows
                per_set[name]["overflow_below_largest_partition"] = measure_partitions(model, x, need - 1)["overflow_tokens"]
    model.set_form("static", capacity=chosen)
    overflow = ", ".join(f"{k} {v['overflow_at_capacity']}" for k, v in per_set.items())
    if capacity == "auto":
        click.echo(f"      --capacity auto: P = {chosen} (largest partition {need} x margin {CAPACITY_AUTO_MARGIN}, "
                   f"N = {n}); overflow at P: {overflow}", err=True)
    if any(v["overflow_at_capacity"] for v in per_set.values()):
        click.secho(f"WARNING: --capacity {capacity if capacity != 'auto' else chosen}: tokens overflow their partition "
                    "(each keeps only itself as neighbour in that block): "
                    + "; ".join(f"{k} {v['overflow_at_capacity']} of {v['slots']} token-block slots "
                                f"({fmt_fraction(v['overflow_fraction'])}), per block {v['overflow_at_capacity_per_block']}"
                                for k, v in per_set.items())
                    + f"; the largest partition measured is {need} (N = {n}): --capacity {need} or auto avoids it "
                    "on these images", fg="yellow", err=True)
    kappa = model.cfg.clusters
    work = {"padded": kappa * chosen * chosen, "masked": n * n}  # similarities per block and image
    if work["padded"] >= work["masked"]:
        click.secho(f"WARNING: --capacity {capacity}: P = {chosen} pads each of the {kappa} partitions to more than "
                    f"N/sqrt(kappa) = {n / math.sqrt(kappa):.0f} tokens, so the padded layout computes kappa*P^2 = "
                    f"{work['padded']:,} similarities per block and image, the masked one N^2 = {work['masked']:,}: "
                    f"the partitions are unbalanced (the largest measured holds {need} of {n} tokens) and --knn "
                    "masked is the cheaper exact graph here", fg="yellow", err=True)
    entry = {"mode": "auto" if capacity == "auto" else "fixed", "capacity": chosen, "tokens": n}
    if capacity == "auto":
        entry["margin"] = CAPACITY_AUTO_MARGIN
    entry.update({"largest_partition": need, "similarities_per_block": work,
                  "padded_cheaper_than_masked": work["padded"] < work["masked"], "sets": per_set})
    return entry


# what makes a variant (sizes and structure): another value makes the model a custom size of it; the class
# count, local update, k-NN layout, preprocessing and numerics are options of a variant (README, "The model")
ARCHITECTURE = ("dim", "depth", "grid", "clusters", "groups", "img_size", "stem_layers", "head_dim", "k_min", "k_max",
                "kmeans_iters", "global_update", "distillation", "features_only", "out_indices", "feature_pyramid")


def describe_model(cfg) -> Dict:
    """The model as report.json and the summary name it: a registered variant by its name; a checkpoint of other
    sizes (e.g. ``cvig convert --config``, recorded under the nearest registered name) as ``custom``, with the
    variant its config starts from (``base``) and the values that differ (``custom``)."""
    model = cfg.to_dict()
    try:
        base = get_config(cfg.name)
    except ValueError:
        base = None
    differs = {k: getattr(cfg, k) for k in ARCHITECTURE if base is None or getattr(cfg, k) != getattr(base, k)}
    if base is None or differs:
        model.update(name="custom", base=cfg.name, custom=differs)
    return {"label": model_label(model), "model": model}


def model_label(model: Dict) -> str:
    """report.json's ``model`` in a few words: ``cvig_digits``, or ``custom (dim=64, depth=2, ...; otherwise cvig_ti)``."""
    if model.get("name") != "custom":
        return str(model.get("name"))
    sizes = ", ".join(f"{k}={v}" for k, v in (model.get("custom") or {}).items())
    return f"custom ({sizes}; otherwise {model.get('base')})"


def tool_versions() -> Dict[str, str]:
    """The versions that made the artifacts (TensorRT's is added where it builds an engine)."""
    def version(dist: str, module) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return getattr(module, "__version__", "unknown")

    import onnxruntime

    return {"clustervig-trt": version("clustervig-trt", clustervig), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def fp16_range_analysis(g32: onnx.ModelProto, inputs: Dict[str, torch.Tensor], islands: List[str],
                        calib_files: Optional[List[Path]], spec: Dict) -> Dict:
    """Range analysis for the FP16 pass (docs/design.md section 5): max |x| of every FP32 tensor on
    the validation images (and the calibration images when --calib-dir is given), and the nodes
    outside the islands that must stay FP32 (:func:`overflow_nodes`)."""
    norm = in_graph_normalization(g32)  # a --normalize-in-graph graph takes RGB in [0, 1]
    batches = {name: [x.numpy()] for name, x in inputs.items()}
    if calib_files:
        try:
            batches["calibration"] = list(file_batches(calib_files, spec))
        except CalibrationDataError as exc:
            raise click.ClickException(str(exc)) from None
    feed = [b if norm is None else b * norm[1] + norm[0] for bs in batches.values() for b in bs]
    ranges = float_tensor_ranges(g32, feed)
    # the largest value FP16 would have to hold: outputs of computing nodes outside the islands
    outside = {o for n in g32.graph.node if not is_island(n.name, islands) and n.op_type not in ("Constant", "ConstantOfShape")
               for o in n.output}
    return {
        "bound": FP16_SAFE_BOUND, "headroom": FP16_HEADROOM,
        "images": {name: int(sum(len(b) for b in bs)) for name, bs in batches.items()},
        "max_abs_outside_islands": max((v for k, v in ranges.items() if k in outside), default=0.0),
        "kept_fp32": overflow_nodes(g32, ranges, islands),
    }


def _keep_failed(stage: Path, out: Path, report: Dict, artifacts: Dict[str, Path], precision: Dict) -> Path:
    """A gate failed: nothing is published; the staged artifacts and report.json move to OUT/failed-<UTC time>/."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, i = out / f"failed-{stamp}", 1
    while dest.exists():
        dest, i = out / f"failed-{stamp}-{i}", i + 1
    for name, path in artifacts.items():  # by name: relative to the folder of this report.json, dest
        report["artifacts"][name] = {"path": path.name, "bytes": path.stat().st_size,
                                     "nodes": len(onnx.load(str(path), load_external_data=False).graph.node)}
    if precision:
        report["artifacts"]["fp16"]["precision_of_compute_ops"] = precision
    report["published"] = False
    report["failed_dir"] = str(dest.resolve())
    write_json_atomic(stage / "report.json", report)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp made it 0700; an ordinary folder like its parent
    os.replace(stage, dest)
    return dest


def _op_counts(g: onnx.ModelProto) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in g.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


_class_names = model_class_names  # recorded names, else ImageNet-1k for 1000 classes, else None


def write_sidecars(stage: Path, names: Optional[List[str]], metas: Dict[str, Dict[str, str]]) -> List[Path]:
    """Files a runtime without ONNX needs beside the engines: ``preprocess.json`` (the flat spec
    cvig_infer and cvig-run read), ``labels.txt`` (``names``: recorded class names, or the ImageNet-1k
    names for a 1000-class model) and ``model_<precision>.json`` (each artifact's ONNX metadata in
    ``metas``, found by TrtSession next to ``model_<precision>.plan`` however the engine was built)."""
    written = []
    pre = stage / "preprocess.json"
    write_json_atomic(pre, json.loads(next(iter(metas.values()))["clustervig.preprocess"]))
    written.append(pre)
    if names:
        labels = stage / "labels.txt"
        labels.write_text("\n".join(names) + "\n")
        written.append(labels)
    for name, meta in metas.items():
        side = stage / f"model_{name}.json"
        write_json_atomic(side, meta)
        written.append(side)
    return written


def summary_table(report: Dict) -> str:
    lines: List[str] = ["", f"model: {model_label(report['model'])}"] if "model" in report else []
    if report.get("outputs"):  # a backbone
        lines.append("outputs: " + ", ".join(f"{o['name']} {o['shape']} stride {o['stride']}" for o in report["outputs"]))
    lines += ["", f"{'artifact':<12} {'nodes':>7} {'MiB':>8}"]
    for name, a in report["artifacts"].items():
        lines.append(f"{name:<12} {a.get('nodes', '-'):>7} {a['bytes'] / 2**20:>8.2f}")
    ra = report.get("fp16_range_analysis")
    if ra:
        lines += ["", _range_analysis_lines(ra)]
    cap = report.get("capacity")
    if cap and cap.get("sets"):
        lines += ["", f"capacity P = {cap['capacity']} of N = {cap['tokens']} ({cap['mode']}; largest partition "
                      f"{cap['largest_partition']}), overflow tokens: " + ", ".join(
                          f"{k} {v['overflow_at_capacity']} ({fmt_fraction(v['overflow_fraction'])} of the slots)"
                          for k, v in cap["sets"].items())]
    val = report.get("validation")
    gates = report.get("gates") or {}
    if val:
        # a gate verdict per row: ok, FAIL, or - (no gate judges this comparison)
        verdict: Dict = {}
        for g in gates.get("results", []):
            key = (g["inputs"], g["comparison"])
            verdict[key] = verdict.get(key, True) and g["passed"]
        width = max([8] + [len(k) for k in val["results"]])
        lines += ["", f"{'inputs':<{width}} {'comparison':<22} {'max|Δ|':>9} {'cos min':>10} {'top1':>8} {'labels':>8} "
                      f"{'neighb.':>8} {'gate':>5}"]
        for set_name, res in val["results"].items():
            for cmp_name, r in res.items():
                lab = fmt_fraction(r["label_agreement"]) if "label_agreement" in r else "-"
                nb = fmt_fraction(r["neighbor_agreement"]) if "neighbor_agreement" in r else "-"
                v = verdict.get((set_name, cmp_name))
                top1 = fmt_fraction(r["top1_agreement"], 0) if "top1_agreement" in r else "-"  # a backbone: none
                lines.append(f"{set_name:<{width}} {cmp_name:<22} {r['max_abs_diff']:>9.2e} {fmt_cosine(r['cosine_min']):>10} "
                             f"{top1:>8} {lab:>8} {nb:>8} "
                             f"{'-' if v is None else 'ok' if v else 'FAIL':>5}")
                for out_name, o in (r.get("outputs") or {}).items():  # a backbone's maps, one by one
                    lines.append(f"{'':<{width}}   {out_name:<20} {o['max_abs_diff']:>9.2e} {fmt_cosine(o['cosine_min']):>10}")
    if val and val.get("accuracy"):
        lines.append("")
        for set_name, acc in val["accuracy"].items():
            lines.append(f"top-1 accuracy on {set_name} ({acc['images']} labelled images): "
                         + ", ".join(f"{k} {fmt_fraction(v)}" for k, v in acc["top1"].items()))
    if gates:
        lines.append("")
        lines.append(_gates_line(gates, report["artifacts"], bool(val and val.get("accuracy")),
                                 backbone=bool(report.get("outputs"))))
    t = report["timings_s"]
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


def _range_analysis_lines(ra: Dict, listed: int = 12) -> str:
    kept = ra["kept_fp32"]
    head = (f"FP16 range analysis ({', '.join(f'{n} {k}' for k, n in ra['images'].items())} images, max |x| outside "
            f"the FP32 islands {ra['max_abs_outside_islands']:.3g}): ")
    if not kept:
        return head + f"no tensor above {ra['bound']:.0f}, nothing kept in FP32 beyond the islands"
    head += f"{len(kept)} nodes kept in FP32 (a tensor above {ra['bound']:.0f} = 65504 / {ra['headroom']:g})"
    if len(kept) <= listed:
        return head + ":\n  " + "\n  ".join(f"{k['node']} ({k['op']}, {k['max_abs']:.3g})" for k in kept)
    scopes: Dict[str, int] = {}
    for k in kept:  # counted per block / top-level module; report.json lists every node
        parts = k["node"].split("/")[0].split(".") if "/" in k["node"] else ["(graph)"]
        sc = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        scopes[sc] = scopes.get(sc, 0) + 1
    return head + ", nodes per module (each node in report.json):\n  " + ", ".join(f"{sc} {n}" for sc, n in scopes.items())


def _gates_line(gates: Dict, artifacts: Dict, labelled: bool = False, backbone: bool = False) -> str:
    if "thresholds" not in gates:
        return f"gates: not checked ({gates.get('why', '')})"
    parts = []
    metrics = ("cosine",) if backbone else ("cosine", "top1")  # a backbone: the worst map's cosine, no top-1
    for art in (a for a in ("fp32", "fp16", "int8", "plugins") if a in artifacts):
        th = [f"{m}>={fmt_fraction(g['threshold']) if m == 'top1' else g['threshold']}"
              for m in metrics for g in [gates["thresholds"][f"{art}.{m}"]] if g["threshold"] is not None]
        drop = gates["thresholds"].get(f"{art}.accuracy_drop", {}).get("threshold")
        if labelled and drop is not None:
            th.append(f"accuracy drop<={drop * 100:g} pt")
        rnd = any(gates["thresholds"][f"{art}.{m}"]["source"].startswith("random") for m in ("cosine", "top1"))
        parts.append(f"{art} finite{''.join(' ' + x for x in th)}{' (random weights)' if rnd else ''}")
    if any(r["gate"] == "capacity.overflow" for r in gates.get("results", [])):
        parts.append(f"capacity overflow<={fmt_threshold(gates['thresholds']['capacity.overflow']['threshold'], True)}")
    n_fail = len(gates["failed"])
    state = "all passed" if not n_fail else f"{n_fail} FAILED" + ("" if gates["enforced"] else " (--no-gates: published)")
    return f"gates ({state}): " + "; ".join(parts)


if __name__ == "__main__":
    main()
