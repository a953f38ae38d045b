"""Triton Inference Server model repositories for exported ClusterViG models.

Writes one model for the ONNX graph (``onnxruntime_onnx`` platform) and, when
an engine exists, one for it (``tensorrt_plan``), each with dynamic batching
when the export has a dynamic batch. Engines that use the ClusterViG plugins
need ``libcvig_plugins.so`` in the server: ``LD_PRELOAD`` or the TensorRT
backend's ``plugins`` option (see the repository's README.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
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
    """Add (or replace) ``<model_name>_onnx`` and, with an engine, ``<model_name>_trt`` in ``repo``; other
    models there are kept, and the repository's README.md describes all of them. Each model folder is
    written beside the repository's models and swapped in whole."""
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} class names for {num_classes} classes")
    models = {f"{model_name}_onnx": ("onnxruntime_onnx", onnx_path, "model.onnx", "KIND_CPU")}
    if engine_path is not None:
        models[f"{model_name}_trt"] = ("tensorrt_plan", engine_path, "model.plan", "KIND_GPU")
    written: Dict[str, Path] = {}
    for name, (platform, src, file_name, kind) in models.items():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        try:
            (tmp / "1").mkdir()
            shutil.copy2(src, tmp / "1" / file_name)
            if labels is not None:
                (tmp / "labels.txt").write_text("\n".join(labels) + "\n")
            (tmp / "config.pbtxt").write_text(model_config(name, platform, batch, img_size, num_classes, input_dtype,
                                                           kind=kind, labels=labels is not None))
            (tmp / NOTE).write_text(json.dumps({"input": [3, img_size, img_size], "input_dtype": input_dtype,
                                                "classes": num_classes, "batch": str(batch),
                                                "plugins": bool(uses_plugins)}) + "\n")
            os.chmod(tmp, 0o755)
            dest = repo / name
            old = None
            if dest.exists():
                old = repo / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written[name] = repo / name
    (repo / "README.md").write_text(repo_readme(repo))
    return written


NOTE = "clustervig.json"  # per model: what the README says of it (Triton ignores other files in a model folder)


def repo_readme(repo: Path) -> str:
    """README.md of the repository: every model folder in it (those written by cvig export described)."""
    lines = ["# Triton model repository", "", "    tritonserver --model-repository=.", "",
             "| model | platform | input `images` | output `logits` |", "|---|---|---|---|"]
    trt_missing, plugins = [], False
    for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
        name = cfg.parent.name
        text = cfg.read_text()
        m = re.search(r'platform:\s*"([^"]+)"', text)
        platform = m.group(1) if m else "?"
        info = {}
        if (cfg.parent / NOTE).is_file():
            try:
                info = json.loads((cfg.parent / NOTE).read_text())
            except ValueError:
                info = {}
        if info:
            s = info["input"]
            lines.append(f"| `{name}` | {platform} | [B, {s[0]}, {s[1]}, {s[2]}] {info['input_dtype']}, preprocessed as "
                         f"recorded in the ONNX metadata | [B, {info['classes']}] |")
            plugins = plugins or info.get("plugins", False)
        else:
            lines.append(f"| `{name}` | {platform} | see its config.pbtxt | |")
        if name.endswith("_onnx") and not (Path(repo) / (name[:-5] + "_trt") / "config.pbtxt").is_file():
            trt_missing.append(name[:-5])
        if platform == "tensorrt_plan":
            plugins = True
    lines.append("")
    for base in trt_missing:
        lines.append(f"No TensorRT engine was built for `{base}` here. On the GPU server, build one (see cvig export's "
                     f"trtexec hint) and add `{base}_trt/1/model.plan` with a config.pbtxt like `{base}_onnx`'s but "
                     "`platform: \"tensorrt_plan\"` and `kind: KIND_GPU` (`cvig export --engine --triton-repo` does all "
                     "of this where TensorRT is installed).")
        lines.append("")
    if plugins:
        lines += ["Engines built from the plugin graph need the ClusterViG plugins in the server process:",
                  "", "    LD_PRELOAD=/path/libcvig_plugins.so tritonserver --model-repository=.",
                  "    tritonserver --model-repository=. --backend-config=tensorrt,plugins=/path/libcvig_plugins.so", ""]
    return "\n".join(lines)
