"""Triton Inference Server model repositories for exported ClusterViG models.

Three backends, one model folder each, all with the same input, output,
labels and (for a dynamic-batch export) dynamic batching up to the export's
maximum batch:

* ``onnxruntime``: ``<name>_onnx``, the ONNX graph on Triton's ONNX Runtime
  backend (``platform: "onnxruntime_onnx"``);
* ``python``: ``<name>_python``, the ONNX graph run by ONNX Runtime inside
  Triton's Python backend (``model.py``: ``triton_python_model.py``), for
  servers without the ONNX Runtime backend (CPU servers, the tests);
* ``tensorrt``: ``<name>_trt``, the engine (``platform: "tensorrt_plan"``).
  Engines that use the ClusterViG plugins need them registered in the
  server: ``libcvig_plugins_autoreg.so`` through ``LD_PRELOAD`` or the
  TensorRT backend's ``plugins`` option (see the repository's README.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


BACKENDS = ("onnxruntime", "python", "tensorrt")
# backend -> (model folder suffix, platform (None: the config names the backend), file in the version
# folder, instance kind)
_LAYOUT = {
    "onnxruntime": ("_onnx", "onnxruntime_onnx", "model.onnx", "KIND_CPU"),
    "python": ("_python", None, "model.onnx", "KIND_CPU"),
    "tensorrt": ("_trt", "tensorrt_plan", "model.plan", "KIND_GPU"),
}
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


def model_config(name: str, platform: str, batch, img_size: int, num_classes: int, input_dtype: str = "float32",
                 output_dtype: str = "float32", kind: str = "KIND_CPU", labels: bool = False,
                 backend: Optional[str] = None) -> str:
    """config.pbtxt text for one model (parsed by Triton's ModelConfig protobuf): ``platform`` names a
    platform (``onnxruntime_onnx``, ``tensorrt_plan``), or ``backend`` a backend (``python``). With
    ``labels`` the output names ``labels.txt`` so Triton's classification extension returns class names."""
    dynamic = batch.dynamic
    max_batch = batch.max if dynamic else 0
    in_dims = [3, img_size, img_size] if dynamic else [batch.opt, 3, img_size, img_size]
    out_dims = [num_classes] if dynamic else [batch.opt, num_classes]
    lines = [
        f'name: "{name}"',
        f'backend: "{backend}"' if backend else f'platform: "{platform}"',
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


def model_names(model_name: str, backends: Sequence[str]) -> List[str]:
    """The model folders ``write_triton_repo`` writes for these backends."""
    return [model_name + _LAYOUT[b][0] for b in backends]


def write_triton_repo(repo: Path, model_name: str, onnx_path: Path, batch, img_size: int, num_classes: int,
                      engine_path: Optional[Path] = None, input_dtype: str = "float32",
                      uses_plugins: bool = False, labels: Optional[Sequence[str]] = None,
                      backends: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Add (or replace) one model per backend in ``repo``: by default ``<model_name>_onnx`` and, with an
    engine, ``<model_name>_trt``. Other models there are kept, and the repository's README.md describes
    all of them. Each model folder is written beside the repository's models and swapped in whole."""
    repo = Path(repo)
    if backends is None:
        backends = ["onnxruntime"] + (["tensorrt"] if engine_path is not None else [])
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown Triton backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    if "tensorrt" in backends and engine_path is None:
        raise ValueError("the tensorrt backend serves an engine, and none was built")
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} class names for {num_classes} classes")
    repo.mkdir(parents=True, exist_ok=True)
    written: Dict[str, Path] = {}
    for backend in dict.fromkeys(backends):
        suffix, platform, file_name, kind = _LAYOUT[backend]
        name = model_name + suffix
        src = engine_path if backend == "tensorrt" else onnx_path
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
        try:
            (tmp / "1").mkdir()
            shutil.copy2(src, tmp / "1" / file_name)
            if backend == "python":
                shutil.copyfile(PYTHON_MODEL, tmp / "1" / "model.py")
            if labels is not None:
                (tmp / "labels.txt").write_text("\n".join(labels) + "\n")
            (tmp / "config.pbtxt").write_text(model_config(name, platform, batch, img_size, num_classes, input_dtype,
                                                           kind=kind, labels=labels is not None,
                                                           backend="python" if backend == "python" else None))
            (tmp / NOTE).write_text(json.dumps({"input": [3, img_size, img_size], "input_dtype": input_dtype,
                                                "classes": num_classes, "batch": str(batch), "backend": backend,
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
    trt_missing, plugins, python_models = [], False, False
    for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
        name = cfg.parent.name
        text = cfg.read_text()
        m = re.search(r'(?:platform|backend):\s*"([^"]+)"', text)
        platform = m.group(1) if m else "?"
        python_models = python_models or platform == "python"
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
        base = re.sub(r"_(onnx|python)$", "", name)
        if base != name and base not in trt_missing and not (Path(repo) / (base + "_trt") / "config.pbtxt").is_file():
            trt_missing.append(base)
        if platform == "tensorrt_plan":
            plugins = True
    lines.append("")
    for base in trt_missing:
        lines.append(f"No TensorRT engine was built for `{base}` here. On the GPU server, build one (see cvig export's "
                     f"trtexec hint) and add `{base}_trt/1/model.plan` with a config.pbtxt like `{base}`'s other models' but "
                     "`platform: \"tensorrt_plan\"` and `kind: KIND_GPU` (`cvig export --engine --triton-repo` does all "
                     "of this where TensorRT is installed).")
        lines.append("")
    if python_models:
        lines += ["Models on the `python` backend run their `model.onnx` with ONNX Runtime in `1/model.py`. The "
                  "server's Python (the first `python3` on its PATH, with its libpython on LD_LIBRARY_PATH) needs "
                  "`numpy<2` and `onnxruntime`; a plugin graph also needs clustervig-trt and onnxruntime-extensions.",
                  ""]
    if plugins:
        lines += ["Engines built from the plugin graph need the ClusterViG plugins registered in the server process. "
                  "Triton loads a plugin library with dlopen (LD_PRELOAD, or the TensorRT backend's `plugins` "
                  "option) and calls nothing in it, so give it `libcvig_plugins_autoreg.so`, which registers the "
                  "creators when it is loaded (keep `libcvig_plugins.so` in the same folder; both built for the "
                  "server's TensorRT major):",
                  "", "    LD_PRELOAD=/path/libcvig_plugins_autoreg.so tritonserver --model-repository=.",
                  "    tritonserver --model-repository=. --backend-config=tensorrt,plugins=/path/libcvig_plugins_autoreg.so",
                  ""]
    return "\n".join(lines)
