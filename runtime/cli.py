"""cvig-run and cvig-bench: classify images and benchmark an exported model (ONNX or TensorRT engine)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import List, Optional, Tuple

import click
import numpy as np

from clustervig.cliutil import CTX, Progress, check_output_file, existing_file, write_json
from clustervig.preprocess import ImageError, spec_hw

from .classify import class_names, classify_files
from .features import extract_features, save_npz, summarize
from .session import RuntimeErrorWithFix, open_session

PLUGINS_LIB_HELP = ("libcvig_plugins.so, for TensorRT engines of the plugin graph (default: the one `cvig build-plugins` "
                    "recorded).")


def _open(model: Path, provider: str, plugins_lib, cuda_graph: bool = False):
    existing_file(model, "model")
    if cuda_graph and model.suffix == ".onnx":
        raise click.UsageError("--cuda-graph applies to TensorRT engines (.plan/.engine), not to ONNX files")
    try:
        return open_session(model, providers=None if provider == "cpu" else [provider], plugin_library=plugins_lib,
                            cuda_graph=cuda_graph)
    except RuntimeErrorWithFix as exc:
        raise click.ClickException(str(exc)) from None


@click.command(context_settings=CTX, epilog="""
\b
Examples:
  cvig-run out/model_fp32.onnx photo1.jpg photo2.png
  cvig-run out/model_fp16.onnx images/*.jpg --topk 3 --batch 16 --json
  cvig-run out/model_fp16.onnx images/*.jpg -o results.json
  cvig-run out/model_fp16.plan photo.jpg --plugins-lib build/plugins/libcvig_plugins.so
  cvig-run out/model_fp16.plan photo.jpg --cuda-graph     # preprocess.json / model_fp16.json read from out/
  cvig-run bb/model_fp32.onnx street.jpg -o maps.npz      # a backbone (cvig export --features): feature maps

\b
Images: PNG or JPEG (README, "Accepted images"), preprocessed as recorded at export.
A backbone export returns feature maps, not classes: each image's maps are
listed (shape, mean, std, max |x|; --json prints that as JSON) and -o FILE.npz
writes the maps themselves (one [images, C, h, w] array per map name, and
"files").
An image that cannot be read (missing, corrupt, another format) is reported on
stderr and left out; the others are classified and printed (and written with
-o), and the exit status is 1 at the end. --strict stops at the first one
instead. Progress goes to stderr for long runs (not with --json).
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--topk", type=click.IntRange(min=1), default=5, help="Classes to show per image.")
@click.option("--batch", type=click.IntRange(min=1), default=8, help="Images per inference call.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the full logits) to stdout instead of a table; "
              "no progress display.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Also write the JSON results to this file (a backbone: its feature maps, to a .npz file).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Class names, one per line (default: recorded at export, else the ImageNet-1k names for a "
                   "1000-class model, else class_<i>).")
@click.option("--strict", is_flag=True, help="Stop at the first image that cannot be read (default: report it, "
              "classify the others, exit 1 at the end).")
@click.option("--provider", default="cpu", help="ONNX Runtime provider, e.g. CUDAExecutionProvider.")
@click.option("--plugins-lib", type=click.Path(path_type=Path), default=None, help=PLUGINS_LIB_HELP)
@click.option("--cuda-graph", is_flag=True, help="TensorRT: capture each input shape into a CUDA graph and replay it.")
def run_main(model, images, topk, batch, as_json, output, labels, strict, provider, plugins_lib, cuda_graph):
    """Classify IMAGES with MODEL (.onnx or .plan/.engine), using the preprocessing recorded at export; with a
    backbone (cvig export --features) compute its named feature maps instead."""
    check_output_file(output, "-o/--output")
    unreadable: List[str] = []

    def report(path: Path, exc: ImageError) -> None:
        unreadable.append(str(path))
        click.echo(f"skipped: {exc}", err=True)

    with _open(model, provider, plugins_lib, cuda_graph) as sess:
        backbone = sess.is_backbone
        if backbone and output is not None and output.suffix != ".npz":
            raise click.UsageError(f"{model.name} is a backbone (a --features export): -o writes its feature maps as "
                                   "NumPy arrays: give -o FILE.npz")
        if backbone and labels is not None:
            raise click.UsageError(f"--labels names classes, and {model.name} is a backbone (a --features export) "
                                   "without any: drop --labels")
        try:
            with Progress(f"cvig run {model.name}", len(images), enabled=not as_json) as bar:
                if backbone:
                    results = extract_features(sess, list(images), batch=batch, on_error=None if strict else report,
                                               progress=lambda done: bar.update(done - bar.done))
                else:
                    names = class_names(sess, labels)
                    results = classify_files(sess, list(images), batch=batch, topk=topk, names=names,
                                             on_error=None if strict else report,
                                             progress=lambda done: bar.update(done - bar.done))
        except (ImageError, ValueError, RuntimeErrorWithFix) as exc:
            raise click.ClickException(str(exc) + (" (--strict: stopped at the first unreadable image)"
                                                   if strict and isinstance(exc, ImageError) else "")) from None
    if backbone:
        summaries = [summarize(r) for r in results]
        if output is not None:
            save_npz(output, results)
        if as_json:
            click.echo(json.dumps(summaries, indent=2))
        else:
            for r in summaries:
                click.echo(r["file"])
                for name, m in r["maps"].items():
                    click.echo(f"  {name:<8} {'x'.join(map(str, m['shape'])):<14} mean {m['mean']:+.4f}  "
                               f"std {m['std']:.4f}  max|x| {m['max_abs']:.4f}")
    else:
        if output is not None:
            write_json(output, results)
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            for r in results:
                click.echo(r["file"])
                for t in r["top"]:
                    click.echo(f"  {t['probability'] * 100:6.2f}%  {t['name']}  (class {t['class']}, "
                               f"logit {t['logit']:.3f})")
    if unreadable:
        raise click.ClickException(
            f"{len(unreadable)} of {len(images)} images could not be read and were left out (each named above"
            f"{'; ' + ', '.join(unreadable) if len(unreadable) <= 3 else ''}); the results are those of the other "
            f"{len(results)}. Fix or remove them, or pass --strict to stop at the first")


def bench(sess, batches: List[int], warmup: int, iters: int) -> List[dict]:
    """Latency percentiles and throughput of ``sess`` at each batch size (random inputs of the model's size)."""
    h, w = spec_hw(sess.preprocess)
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, 3, h, w)).astype(np.float32)
        for _ in range(warmup):
            sess.infer(x)
        lat = []
        for _ in range(iters):
            t0 = time.perf_counter()
            sess.infer(x)
            lat.append(time.perf_counter() - t0)
        s = sorted(lat)
        q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
        med = statistics.median(s)
        rows.append({"batch": b, "latency_ms_p50": med * 1e3, "latency_ms_p90": q(0.9) * 1e3,
                     "latency_ms_p99": q(0.99) * 1e3, "throughput_img_s": b / med, "iters": iters})
    return rows


DEFAULT_BATCHES = [1, 8, 32]  # for a model that records no batch range


def default_batches(profile: Optional[Tuple[int, int, int]]) -> List[int]:
    """The batches to time when --batch is not given: the artifact's own (its static batch; min, opt and max of a
    dynamic range), else 1, 8 and 32."""
    return sorted(set(profile)) if profile else list(DEFAULT_BATCHES)


def describe_profile(profile: Tuple[int, int, int]) -> str:
    lo, opt, hi = profile
    return f"a static batch of {lo}" if lo == hi else f"batches {lo} to {hi} (exported with --dynamic-batch {lo}:{opt}:{hi})"


def bench_table(model: Path, rows: List[dict]) -> str:
    lines = [f"{model.name}", f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['latency_ms_p50']:>9.2f} {r['latency_ms_p90']:>9.2f} "
                     f"{r['latency_ms_p99']:>9.2f} {r['throughput_img_s']:>9.1f}")
    return "\n".join(lines)


def parse_batches(ctx, param, text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        bs = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,8,32") from None
    if not bs or min(bs) < 1:
        raise click.BadParameter(f"{text!r}: batch sizes are integers >= 1, e.g. 1,8,32")
    return list(dict.fromkeys(bs))


@click.command(context_settings=CTX, epilog="""
\b
Examples:
  cvig-bench out/model_fp32.onnx                    # the batches the export was made for
  cvig-bench out/model_fp16.onnx --batch 1,16 --iters 50 -o bench.json
  cvig-bench out/model_fp16.plan --batch 1,8,32 --cuda-graph

\b
Without --batch the artifact's own batches are timed: a static export's
batch, or the min, opt and max of a --dynamic-batch export's range (1, 8
and 32 for a model that records none). A requested batch outside that
range is skipped with a note on stderr (an engine cannot run it; for a
static batch of 1, batch 8 would only be eight runs of 1).
""")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--batch", "batches", default=None, callback=parse_batches, metavar="B1,B2,...",
              help="Comma-separated batch sizes (Table VI layout) [default: the artifact's own batches].")
@click.option("--warmup", type=click.IntRange(min=0), default=3, help="Untimed runs per batch size before timing.")
@click.option("--iters", type=click.IntRange(min=1), default=10, help="Timed runs per batch size (the median is reported).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON to stdout instead of a table.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Also write the rows as JSON to this file.")
@click.option("--provider", default="cpu", help="ONNX Runtime provider, e.g. CUDAExecutionProvider.")
@click.option("--plugins-lib", type=click.Path(path_type=Path), default=None, help=PLUGINS_LIB_HELP)
@click.option("--cuda-graph", is_flag=True, help="TensorRT: capture each input shape into a CUDA graph and replay it.")
def bench_main(model, batches, warmup, iters, as_json, output, provider, plugins_lib, cuda_graph):
    """Latency percentiles and throughput of MODEL per batch size, like the paper's Table VI."""
    check_output_file(output, "-o/--output")
    with _open(model, provider, plugins_lib, cuda_graph) as sess:
        profile = sess.batch_profile
        wanted = batches if batches is not None else default_batches(profile)
        fits = [b for b in wanted if profile is None or profile[0] <= b <= profile[2]]
        skipped = [b for b in wanted if b not in fits]
        if not fits:
            raise click.ClickException(f"{model} takes {describe_profile(profile)}, not batch "
                                       f"{', '.join(map(str, skipped))}: give --batch within that, or leave --batch out")
        if skipped:
            click.echo(f"skipped batch {skipped}: {model.name} takes {describe_profile(profile)}; export with a "
                       "--dynamic-batch MIN:OPT:MAX range that covers them to benchmark them", err=True)
        rows = bench(sess, fits, warmup, iters)
    result = {"model": str(model), "rows": rows}
    if output is not None:
        write_json(output, result)
    click.echo(json.dumps(result, indent=2) if as_json else bench_table(model, rows))
