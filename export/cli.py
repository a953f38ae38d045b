"""cvig-export: checkpoint -> validated FP32/FP16 ONNX (and a TensorRT engine where TensorRT is installed)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import click
import onnx
import torch

import clustervig
from clustervig.checkpoint import CheckpointError, model_from_checkpoint
from clustervig.preprocess import sample_photographs, transform_spec
from clustervig.utils import calibrate_batchnorm

from .fp16 import DEFAULT_FP32_ISLANDS, convert_fp16, count_precision
from clustervig.calib import CalibrationDataError, folder_batches, image_files, load_or_collect, quantize_qdq

from .plugin_graph import SurgeryError, to_plugin_graph
from .onnx_export import MIN_OPSET, BatchSpec, ExportError, atomic_save, check_model, export_onnx, get_metadata, set_metadata
from .triton import write_triton_repo
from .trt_compat import tensorrt_op_issues
from .trt_build import TensorRTUnavailable, build_command_hint, build_engine
from .validate import validate as run_validation  # `validate` is the --validate flag in main

MIN_CALIB_SAMPLES = 8

EXAMPLES = """
\b
Examples:
  cvig-export --model cvig_ti --checkpoint ck.pth --fp16 -o out/
  cvig-export --model cvig_nano --fp16 -o out/                 # random weights (warned), a quick demo
  cvig-export --checkpoint clustervig/weights/cvig_digits.pth --dynamic-batch 1:32:256 --fp16 -o out/
  cvig-export --model cvig_b_hr --knn padded --capacity 200 --checkpoint b_hr.pth -o out/

\b
Writes into OUT: model_fp32.onnx, model_fp16.onnx (with --fp16), model_*.plan
(with TensorRT), report.json, and for runtimes without ONNX: preprocess.json,
labels.txt (class names; ImageNet-1k for 1000 classes) and model_*.json (the
ONNX metadata, read by cvig-run beside model_*.plan). Files appear only when
the whole export succeeded (they are staged in a temporary folder first).
"""


def _step(i: int, n: int, text: str):
    click.echo(click.style(f"[{i}/{n}] ", fg="cyan") + text, err=True)
    return time.perf_counter()


def _done(t0: float, extra: str = "") -> float:
    dt = time.perf_counter() - t0
    click.echo(f"      done in {dt:.1f}s{(' - ' + extra) if extra else ''}", err=True)
    return dt


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot create output directory {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise click.ClickException(f"output directory {out} is not writable; choose another with -o")


def build_model(model_name: Optional[str], checkpoint: Optional[Path], num_classes: Optional[int],
                overrides: Dict) -> clustervig.ClusterViG:
    try:
        if model_name is None:
            if checkpoint is None:
                raise click.UsageError("give --model NAME, or --checkpoint of a file saved by clustervig (it records its model)")
            return model_from_checkpoint(checkpoint, **overrides)
        return clustervig.create_model(model_name, pretrained=checkpoint, num_classes=num_classes, **overrides)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def validation_inputs(model, batch: BatchSpec, samples: int) -> Dict[str, torch.Tensor]:
    # a static-batch graph is validated b images at a time on the smallest multiple of b
    # holding `samples` images: batch 1 must not mean one validation image
    n = batch.opt * -(-samples // batch.opt) if not batch.dynamic else min(max(samples, batch.min), batch.max)
    photos = sample_photographs(transform_spec(model.cfg))
    reps = -(-n // len(photos))
    g = torch.Generator().manual_seed(0)
    size = model.cfg.img_size
    return {"photos": photos.repeat(reps, 1, 1, 1)[:n], "random": torch.randn(n, 3, size, size, generator=g)}


@click.command(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", "model_name", type=click.Choice(clustervig.list_models()), default=None,
              help="Variant to export. May be omitted when --checkpoint was saved by clustervig.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Weights (.pth). Absent: random weights, BN calibrated on sample photos - loudly warned.")
@click.option("--num-classes", type=int, default=None, help="Classifier outputs (default: the variant's).")
@click.option("--seed", type=int, default=0, help="Seed of the random weights when there is no --checkpoint (reproducible demos and benchmarks).")
@click.option("--gcn", type=click.Choice(["mr", "edge", "sage", "gin"]), default=None, help="Local update (default: the variant's).")
@click.option("--batch", type=int, default=None, help="Static batch size (default 1).")
@click.option("--dynamic-batch", default=None, metavar="MIN:OPT:MAX", help="Dynamic batch range, e.g. 1:8:32.")
@click.option("--fp16/--no-fp16", default=False, help="Also write an FP16 graph (FP16 compute, FP32 islands).")
@click.option("--fp16-io/--fp32-io", default=False, help="FP16 graph takes and returns float16.")
@click.option("--fp32-islands", default=",".join(DEFAULT_FP32_ISLANDS),
              help="DEGC pieces kept in FP32 in the FP16 graph (norm,kmeans,knn,centroids,gat,local).")
@click.option("--int8/--no-int8", default=False, help="Also write an INT8 Q/DQ graph calibrated on --calib-dir.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None, help="Folder of calibration images (JPEG/PNG).")
@click.option("--calib-method", type=click.Choice(["entropy", "percentile", "max"]), default="entropy",
              help="Activation range method.")
@click.option("--calib-samples", type=int, default=64, help="Calibration images used (at least 8).")
@click.option("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET}).")
@click.option("--knn", type=click.Choice(["auto", "masked", "padded"]), default="auto",
              help="Static k-NN layout: masked N x N TopK, or padded partitions.")
@click.option("--capacity", type=int, default=None, help="Padded-partition capacity P (default N: exact).")
@click.option("--normalize-in-graph/--normalize-outside", default=False,
              help="Put (x - mean) / std in the graph (input is RGB in [0, 1]).")
@click.option("--simplify/--no-simplify", default=True,
              help="Fold constants and remove dead nodes (names kept; outputs bit-identical).")
@click.option("--plugins/--no-plugins", default=False,
              help="Also write model_plugins.onnx: k-means, k-NN and gather-max-rel of every DEGC as TensorRT plugin nodes.")
@click.option("--engine/--no-engine", default=True, help="Build TensorRT engines when tensorrt is importable.")
@click.option("--workspace", type=int, default=2048, help="TensorRT workspace limit in MiB.")
@click.option("--tf32/--no-tf32", default=False,
              help="Let TensorRT run FP32 layers in TF32 (10-bit mantissa inputs); off keeps the FP32 islands FP32.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="TensorRT timing cache file (read and updated).")
@click.option("--triton-repo", type=click.Path(path_type=Path), default=None,
              help="Also write a Triton model repository (ONNX Runtime model, and the engine when built).")
@click.option("--validate/--no-validate", default=True, help="Compare every artifact with PyTorch.")
@click.option("--samples", type=int, default=4, help="Images per validation input set (dynamic batch).")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
def main(model_name, checkpoint, num_classes, seed, gcn, batch, dynamic_batch, fp16, fp16_io, fp32_islands, int8, calib_dir,
         calib_method, calib_samples, opset, knn,
         capacity, normalize_in_graph, simplify, plugins, engine, workspace, tf32, timing_cache, triton_repo, validate, samples, out):
    """Export a ClusterViG checkpoint to ONNX (FP32, optionally FP16), validate it against
    PyTorch, and build TensorRT engines where TensorRT is installed."""
    if batch is not None and dynamic_batch is not None:
        raise click.UsageError("use either --batch or --dynamic-batch, not both")
    if batch is not None and batch < 1:
        raise click.UsageError("--batch must be >= 1")
    try:
        bspec = BatchSpec.parse(dynamic_batch) if dynamic_batch else BatchSpec(batch or 1, batch or 1, batch or 1)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if opset < MIN_OPSET:
        raise click.ClickException(f"opset {opset} is too low: ClusterViG needs opset >= {MIN_OPSET} (e.g. --opset {MIN_OPSET})")
    if checkpoint is not None and not checkpoint.is_file():
        raise click.ClickException(f"checkpoint {checkpoint} does not exist (check the path)")
    if int8 and calib_dir is None:
        raise click.UsageError("--int8 needs --calib-dir DIR with calibration images")
    if int8 and calib_samples < MIN_CALIB_SAMPLES:
        raise click.UsageError(f"--calib-samples {calib_samples}: at least {MIN_CALIB_SAMPLES} are needed")
    if int8:
        try:
            image_files(calib_dir)
        except CalibrationDataError as exc:
            raise click.ClickException(str(exc)) from None
    islands = [p for p in fp32_islands.split(",") if p]
    _check_out_dir(out)
    n_steps = 3 + int(fp16) + int(validate) + int(plugins) + int(int8)
    step = 0
    timings: Dict[str, float] = {}
    overrides = {k: v for k, v in dict(gcn=gcn, knn=knn, capacity=capacity).items() if v is not None}

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
        calibrate_batchnorm(model, [sample_photographs(transform_spec(model.cfg))])
    timings["build_model"] = _done(t, f"{model.cfg.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")

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
            g16 = convert_fp16(onnx.load(str(fp32_path)), islands, fp16_io)
            set_metadata(g16, {"clustervig.precision": "fp16", "clustervig.fp32_islands": ",".join(islands),
                               "clustervig.io": "fp16" if fp16_io else "fp32"})
            check_model(g16)
            atomic_save(g16, stage / "model_fp16.onnx")
            artifacts["fp16"] = stage / "model_fp16.onnx"
            precision = count_precision(g16)
            timings["export_fp16"] = _done(t, f"{len(g16.graph.node)} nodes; Conv FP16 {precision['Conv']['fp16']}, "
                                              f"MatMul FP16 {precision['MatMul']['fp16']} / FP32 {precision['MatMul']['fp32']}")
        if int8:
            step += 1
            t = _step(step, n_steps, f"INT8 Q/DQ graph ({calib_method} calibration on {calib_dir})")
            g32 = onnx.load(str(fp32_path))
            cache = out / "calibration_cache.json"
            spec = transform_spec(model.cfg)
            try:
                cal = load_or_collect(g32, lambda: folder_batches(calib_dir, spec, calib_samples, 8, MIN_CALIB_SAMPLES),
                                      calib_method, calib_samples, cache)
            except CalibrationDataError as exc:
                raise click.ClickException(str(exc)) from None
            g8 = quantize_qdq(g32, cal["ranges"])
            set_metadata(g8, {"clustervig.precision": "int8", "clustervig.calibration": calib_method})
            check_model(g8)
            atomic_save(g8, stage / "model_int8.onnx")
            artifacts["int8"] = stage / "model_int8.onnx"
            timings["export_int8"] = _done(t, f"{len(cal['ranges'])} activation ranges"
                                              f"{' (from cache)' if cal['cached'] else ''}")
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
        report: Dict = {
            "model": model.cfg.to_dict(),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "random_weights": checkpoint is None,
            "seed": seed if checkpoint is None else None,
            "batch": str(bspec),
            "opset": opset,
            "fp32_islands": islands if fp16 else None,
            "plugins": {"replaced": surgery.replaced, "nodes_before": surgery.nodes_before,
                        "nodes_after": surgery.nodes_after} if plugins else None,
            "artifacts": {},
            "timings_s": timings,
        }
        if validate:
            step += 1
            t = _step(step, n_steps, "validating against the PyTorch static form (photos + random inputs)")
            report["validation"] = run_validation(model, artifacts, inputs)
            timings["validate"] = _done(t)
        step += 1
        t = _step(step, n_steps, "TensorRT engines")
        engines = {}
        if engine:
            for name, path in artifacts.items():
                if name == "plugins":
                    continue  # needs libcvig_plugins.so: trtexec --dynamicPlugins (plugins/README.md)
                plan = stage / f"model_{name}.plan"
                try:
                    build_engine(path, plan, bspec, model.cfg.img_size, workspace, timing_cache, tf32=tf32)
                    engines[name] = plan
                except TensorRTUnavailable:
                    hints = [build_command_hint(out / p.name, out / f"model_{n}.plan", bspec, model.cfg.img_size, tf32,
                                                "build/plugins/libcvig_plugins.so" if n == "plugins" else None)
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
            entry = {"path": str(out / path.name), "bytes": path.stat().st_size}
            if path.suffix == ".onnx":
                g = onnx.load(str(path), load_external_data=False)
                metas[name] = get_metadata(g)
                entry["nodes"] = len(g.graph.node)
                entry["op_counts"] = _op_counts(g)
                entry["tensorrt_op_issues"] = tensorrt_op_issues(g)
                for line in entry["tensorrt_op_issues"]:
                    click.secho(f"WARNING: {path.name}: TensorRT will reject {line}", fg="yellow", err=True)
            report["artifacts"][name] = entry
        names = _class_names(model.cfg)
        sidecars = write_sidecars(stage, names, metas)
        # publish: everything or nothing
        final = {}
        for path in sidecars:
            os.replace(path, out / path.name)
        for name, path in staged.items():
            dest = out / path.name
            os.replace(path, dest)
            final[name] = dest
        if precision:
            report["artifacts"]["fp16"]["precision_of_compute_ops"] = precision
        if triton_repo is not None:
            name = model.cfg.name
            src = final.get("fp16", final["fp32"])
            written = write_triton_repo(triton_repo, name, src, bspec, model.cfg.img_size, model.cfg.num_classes,
                                        engine_path=final.get("fp16_engine", final.get("fp32_engine")),
                                        input_dtype="float16" if (fp16 and fp16_io) else "float32",
                                        labels=names)
            report["triton_repo"] = {k: str(v) for k, v in written.items()}
            click.echo(f"Triton repository: {triton_repo} ({', '.join(written)})", err=True)
        report["sidecars"] = [p.name for p in sidecars]
        _write_json(out / "report.json", report)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    click.echo(summary_table(report), err=False)
    click.echo(f"report: {out / 'report.json'}")


def _op_counts(g: onnx.ModelProto) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for n in g.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _class_names(cfg) -> Optional[List[str]]:
    """Recorded class names, else the ImageNet-1k names for a 1000-class model, else None."""
    from clustervig.runtime.classify import imagenet1k_names

    return list(cfg.class_names) if cfg.class_names else (imagenet1k_names() if cfg.num_classes == 1000 else None)


def write_sidecars(stage: Path, names: Optional[List[str]], metas: Dict[str, Dict[str, str]]) -> List[Path]:
    """Files a runtime without ONNX needs beside the engines: ``preprocess.json`` (the flat spec
    cvig_infer and cvig-run read), ``labels.txt`` (``names``: recorded class names, or the ImageNet-1k
    names for a 1000-class model) and ``model_<precision>.json`` (each artifact's ONNX metadata in
    ``metas``, found by TrtSession next to ``model_<precision>.plan`` however the engine was built)."""
    written = []
    pre = stage / "preprocess.json"
    _write_json(pre, json.loads(next(iter(metas.values()))["clustervig.preprocess"]))
    written.append(pre)
    if names:
        labels = stage / "labels.txt"
        labels.write_text("\n".join(names) + "\n")
        written.append(labels)
    for name, meta in metas.items():
        side = stage / f"model_{name}.json"
        _write_json(side, meta)
        written.append(side)
    return written


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def summary_table(report: Dict) -> str:
    lines: List[str] = ["", f"{'artifact':<12} {'nodes':>7} {'MiB':>8}"]
    for name, a in report["artifacts"].items():
        lines.append(f"{name:<12} {a.get('nodes', '-'):>7} {a['bytes'] / 2**20:>8.2f}")
    val = report.get("validation")
    if val:
        lines += ["", f"{'inputs':<8} {'comparison':<22} {'max|Δ|':>9} {'cos min':>9} {'top1':>6} {'labels':>7} {'neighb.':>7}"]
        for set_name, res in val["results"].items():
            for cmp_name, r in res.items():
                lab = f"{r['label_agreement'] * 100:6.2f}%" if "label_agreement" in r else "      -"
                nb = f"{r['neighbor_agreement'] * 100:6.2f}%" if "neighbor_agreement" in r else "      -"
                lines.append(f"{set_name:<8} {cmp_name:<22} {r['max_abs_diff']:>9.2e} {r['cosine_min']:>9.6f} "
                             f"{r['top1_agreement'] * 100:>5.0f}% {lab} {nb}")
    t = report["timings_s"]
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
