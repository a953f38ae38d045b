"""Triton Inference Server model repositories for exported ClusterViG models.

Writes one model for the ONNX graph (``onnxruntime_onnx`` platform) and, when
an engine exists, one for it (``tensorrt_plan``), each with dynamic batching
when the export has a dynamic batch. Engines that use the ClusterViG plugins
need ``libcvig_plugins.so`` in the server: ``LD_PRELOAD`` or the TensorRT
backend's ``plugins`` option (see the repository's README.md).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


def model_config(name: str, platform: str, batch, img_size: int, num_classes: int, input_dtype: str = "float32",
                 output_dtype: str = "float32", kind: str = "KIND_CPU", labels: bool = False) -> str:
    """config.pbtxt text for one model (parsed by Triton's ModelConfig protobuf). With ``labels``
    the output names ``labels.txt`` so Triton's classification extension returns class names."""
    dynamic = batch.dynamic
    max_batch = batch.max if dynamic else 0
    in_dims = [3, img_size, img_size] if dynamic else [batch.opt, 3, img_size, img_size]
    out_dims = [num_classes] if dynamic else [batch.opt, num_classes]
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "input [",
        "  {",
        '    name: "images"',
        f"    data_type: {DTYPES[input_dtype]}",
        f"    dims: [ {', '.join(map(str, in_dims))} ]",
        "  }",
        "]",
        "output [",
        "  {",
        '    name: "logits"',
        f"    data_type: {DTYPES[output_dtype]}",
        f"    dims: [ {', '.join(map(str, out_dims))} ]",
        *(['    label_filename: "labels.txt"'] if labels else []),
        "  }",
        "]",
        "instance_group [ { count: 1, kind: %s } ]" % kind,
    ]
    if dynamic:
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {batch.opt} ]", "  max_queue_delay_microseconds: 100", "}"]
    return "\n".join(lines) + "\n"


def write_triton_repo(repo: Path, model_name: str, onnx_path: Path, batch, img_size: int, num_classes: int,
                      engine_path: Optional[Path] = None, input_dtype: str = "float32",
                      uses_plugins: bool = False, labels: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    repo = Path(repo)
    written: Dict[str, Path] = {}
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} class names for {num_classes} classes")

    def add_labels(model_dir: Path) -> None:
        if labels is not None:
            (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")

    onnx_name = f"{model_name}_onnx"
    (repo / onnx_name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(onnx_path, repo / onnx_name / "1" / "model.onnx")
    add_labels(repo / onnx_name)
    (repo / onnx_name / "config.pbtxt").write_text(
        model_config(onnx_name, "onnxruntime_onnx", batch, img_size, num_classes, input_dtype, labels=labels is not None))
    written[onnx_name] = repo / onnx_name
    trt_name = f"{model_name}_trt"
    note = ""
    if engine_path is not None:
        (repo / trt_name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(engine_path, repo / trt_name / "1" / "model.plan")
        add_labels(repo / trt_name)
        (repo / trt_name / "config.pbtxt").write_text(
            model_config(trt_name, "tensorrt_plan", batch, img_size, num_classes, input_dtype, kind="KIND_GPU",
                         labels=labels is not None))
        written[trt_name] = repo / trt_name
    else:
        note = (f"No TensorRT engine was built here. On the GPU server, build one (see cvig-export's hint) and add\n"
                f"`{trt_name}/1/model.plan` with a config.pbtxt like `{onnx_name}`'s but `platform: \"tensorrt_plan\"`\n"
                "and `kind: KIND_GPU` (cvig-export --engine --triton-repo does all of this where TensorRT is installed).\n")
    plugin_note = (
        "Engines built from the plugin graph need the ClusterViG plugins in the server process:\n"
        "  LD_PRELOAD=/path/libcvig_plugins.so tritonserver --model-repository=.\n"
        "or  tritonserver --model-repository=. --backend-config=tensorrt,plugins=/path/libcvig_plugins.so\n"
        if uses_plugins or engine_path is not None else "")
    (repo / "README.md").write_text(
        f"# Triton model repository for {model_name}\n\n"
        f"Input `images` [B, 3, {img_size}, {img_size}] ({input_dtype}, preprocessed as recorded in the ONNX metadata),"
        f" output `logits` [B, {num_classes}].\n\n"
        "    tritonserver --model-repository=.\n\n" + note + ("\n" + plugin_note if plugin_note else ""))
    return written
