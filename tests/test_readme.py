"""Every command of the README's fenced ```bash blocks is run here, or listed in NOT_RUN with the reason.

The commands are read from README.md itself (continuation lines joined, trailing comments dropped), so a command
added to the README that is neither run below nor listed in NOT_RUN fails `test_every_readme_command_is_accounted_for`,
and so does an entry here whose command left the README.

Each command runs with bash in a fresh folder (a "scenario": the files the README's preceding commands would have
made there), with `cvig`, `cvig-*` and `polygraphy` of this environment on PATH. Substitutions, each named in
the SCENARIOS table next to its command:

* `clustervig/weights/...` (the README runs from a checkout) -> the same file in this checkout, everywhere;
* `ck.pth`, `checkpoint.pth`, `small.pth`, `photo.jpg`, `more/*.png`, `calib_images/`: made by the scenario
  (named in its `setup`);
* sizes: a variant too slow to export here (`cvig_ti`, `cvig_s`) becomes `cvig_nano`, training runs one epoch,
  the photo-patches export validates 8 held-out crops and calibrates on 16 (not 256 and 64); `...` and
  `[--option a|b]` placeholders become one concrete choice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

import clustervig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
DIGITS = ROOT / "clustervig" / "weights" / "cvig_digits.pth"
FIX = ROOT / "tests" / "fixtures" / "authors"


def readme_commands(text: Optional[str] = None) -> List[str]:
    """The commands of README.md's ```bash blocks, in order, each once: continuation lines joined, whitespace
    collapsed, a trailing `# comment` and comment-only lines dropped."""
    text = README.read_text() if text is None else text
    commands: List[str] = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            command = " ".join(re.split(r"\s#\s", line, maxsplit=1)[0].split())
            if command not in commands:
                commands.append(command)
    return commands


# README command -> why it does not run here
NOT_RUN: Dict[str, str] = {
    ". .venv/bin/activate && python -m pytest -q -n auto --dist loadfile":
        "the test suite itself (this file is part of it)",
    "python -m build":
        "builds the sdist and the wheel (a compiler, minutes): .ci/installed builds and installs them in a fresh "
        "environment and runs tests/installed there",
    "pip install clustervig_trt-*.whl":
        "installs into the environment the tests run in: .ci/installed does it in its own environment",
    "cvig build-plugins":
        "builds CUDA kernels and TensorRT plugins for the local GPU: needs nvcc, TensorRT headers and a GPU "
        "(tests/test_plugins_build.py builds the same CMake project for every default architecture)",
    "cvig train-photos -o cvig_photos.pth":
        "31 min (one epoch alone takes minutes on 2 cores); tests/test_photo_data.py trains a step of the same "
        "recipe through the same code and checks the checkpoint it writes",
    "python -m bench.trained224":
        "the FP16/INT8 fidelity benchmark on 256 crops at 224 px (minutes); tests/test_trained224.py guards the "
        "same measurements on 32 held-out crops",
    "cvig-compare out/model_fp16.plan --checkpoint ck.pth":
        "a TensorRT engine: needs TensorRT and a GPU (cvig export builds no .plan without them)",
    "polygraphy run out/model_fp32.onnx --onnxrt --trt --input-shapes images:[1,3,224,224]":
        "TensorRT (--trt): needs TensorRT and a GPU",
    "polygraphy run out/model_plugins.onnx --trt --plugins build/plugins/libcvig_plugins_autoreg.so "
    "--input-shapes images:[1,3,224,224]":
        "TensorRT with the plugin library built against it: needs TensorRT and a GPU",
    "CVIG_MODELOPT_PYTHON=/opt/modelopt-venv/bin/python cvig-export ... --int8 --int8-backend modelopt "
    "--calib-method max":
        "needs NVIDIA ModelOpt in its own 2 GB environment; without it the option is refused before any work "
        "(tests/test_calib.py::test_modelopt_backend_errors)",
    "LD_PRELOAD=/opt/cvig/libcvig_plugins_autoreg.so tritonserver --model-repository=models/":
        "a tritonserver with the TensorRT backend and plugins built against TensorRT (the pip server here has the "
        "Python backend only)",
    "tritonserver --model-repository=models/ --backend-config=tensorrt,plugins=/opt/cvig/libcvig_plugins_autoreg.so":
        "a tritonserver with the TensorRT backend and plugins built against TensorRT (the pip server here has the "
        "Python backend only)",
}

SETUP = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' && "
         "cvig-export --checkpoint clustervig/weights/cvig_digits.pth --fp16 -o out/")
CONVERT_SMALL = "cvig convert --from authors small.pth --config small.json -o small_cvig.pth"

# scenario -> [(README command, the command run instead or None for the same)], run in order in one folder
SCENARIOS: Dict[str, list] = {
    "help": [
        ("cvig --help", None),
        ("cvig export --help", None),
        ("cvig --version", None),
        ("cvig-export --help", None),
        ("cvig doctor", None),
        ("cvig-profile --table3", None),
        ("cvig-profile --model cvig_ti --gcn gin", None),
        ("cvig-profile --checkpoint clustervig/weights/cvig_digits.pth", None),
    ],
    # the README's first command's out/: the digits model, static batch 1, FP16; ck.pth is the digits checkpoint
    "digits": [
        (SETUP, "cvig-export --checkpoint clustervig/weights/cvig_digits.pth --fp16 -o out/"),  # the environment
        # steps are the one this test runs in (.ci/run makes it afresh with exactly these steps)
        ("cvig-compare out/model_fp32.onnx --checkpoint ck.pth", None),
        ("cvig-compare out/model_fp32.onnx out/model_fp16.onnx --atol 0.05 --rtol 0.05", None),
        ("polygraphy run out/model_fp32.onnx --onnxrt --input-shapes images:[1,3,32,32] --val-range images:[-1,1] "
         "--save-outputs fp32_outputs.json", None),
        ("polygraphy run out/model_fp16.onnx --onnxrt --input-shapes images:[1,3,32,32] --val-range images:[-1,1] "
         "--load-outputs fp32_outputs.json --atol 0.05 --rtol 0.05", None),
        ("cvig-run out/model_fp32.onnx photo.jpg more/*.png --topk 5", None),
        ("cvig-bench out/model_fp32.onnx -o bench.json", None),
        ("cvig-export ... --triton-repo triton/",  # "...": the export's other options
         "cvig-export --checkpoint clustervig/weights/cvig_digits.pth --no-validate --triton-repo triton/ -o out/"),
    ],
    "exports": [
        ("cvig-export --model cvig_ti --checkpoint ck.pth --fp16 -o out/",  # ck.pth: a cvig_nano checkpoint
         "cvig-export --model cvig_nano --checkpoint ck.pth --fp16 -o out/"),
        ("cvig-export --checkpoint clustervig/weights/cvig_digits.pth --dynamic-batch 1:32:256 --fp16 -o out/", None),
        ("cvig-export --model cvig_nano --fp16 -o out/", None),
    ],
    # ck.pth: the digits checkpoint; calib_images/: 30 training scans (cvig dataset digits --per-class 3)
    "int8": [
        ("cvig-export --checkpoint ck.pth --fp16 --int8 --calib-dir calib_images/ [--calib-method "
         "entropy|percentile|max] [--calib-samples 64] -o out/",
         "cvig-export --checkpoint ck.pth --fp16 --int8 --calib-dir calib_images/ --calib-method entropy "
         "--calib-samples 64 -o out/"),
        ("cvig-accuracy out/model_fp32.onnx out/model_fp16.onnx out/model_int8.onnx --checkpoint ck.pth --digits",
         None),
    ],
    "photos": [
        ("cvig dataset photo-patches --split train --per-class 4 -o calib/",
         "cvig dataset photo-patches --split train --per-class 1 -o calib/"),
        ("cvig export --checkpoint clustervig/weights/cvig_photos.pth --fp16 --int8 --calib-dir calib/ "
         "--validate-set photo-patches --validate-images 0 -o out/",
         "cvig export --checkpoint clustervig/weights/cvig_photos.pth --fp16 --int8 --calib-dir calib/ "
         "--validate-set photo-patches --validate-images 8 -o out/"),
        ("polygraphy run out/model_fp32.onnx --onnxrt --input-shapes images:[1,3,224,224] "
         "--save-outputs fp32_outputs.json", None),
        ("polygraphy run out/model_fp16.onnx --onnxrt --input-shapes images:[1,3,224,224] "
         "--load-outputs fp32_outputs.json --atol 0.05 --rtol 0.05", None),
    ],
    # checkpoint.pth / model_best.pth: a cvig_nano in the authors' layout (authors_layout below);
    # small.pth / small.json: the authors' own small model and its config (tests/fixtures/authors)
    "convert": [
        ("cvig convert --from authors checkpoint.pth -o cvig_ti_authors.pth", None),
        ("cvig convert --from authors model_best.pth --model cvig_s -o cvig_s.pth",
         "cvig convert --from authors model_best.pth --model cvig_nano -o cvig_s.pth"),
        (CONVERT_SMALL, None),
        ("cvig export --checkpoint cvig_ti_authors.pth --fp16 -o out/", None),
    ],
    "train": [
        ("cvig-train-digits", "cvig-train-digits --epochs 1"),
        ("cvig-train-digits -o d.pth", "cvig-train-digits -o d.pth --epochs 1"),
    ],
    "triton": [
        ("cvig export --model cvig_ti --dynamic-batch 1:8:32 --fp16 --triton-repo models/ --triton-backend python "
         "-o out/",
         "cvig export --model cvig_nano --dynamic-batch 1:8:32 --fp16 --triton-repo models/ --triton-backend python "
         "-o out/"),
        # until Ctrl-C: started in the background, Ctrl-C sent once it serves (run_serve below)
        ("python -m clustervig.runtime.triton_local serve models/", "SERVE"),
    ],
}


def test_every_readme_command_is_accounted_for():
    run = [cmd for steps in SCENARIOS.values() for cmd, _ in steps]
    assert len(run) == len(set(run)), "a README command is run in two scenarios"
    assert not set(run) & set(NOT_RUN)
    found = readme_commands()
    unaccounted = [c for c in found if c not in run and c not in NOT_RUN]
    stale = [c for c in run + list(NOT_RUN) if c not in found]
    assert not unaccounted, f"README commands neither run by tests/test_readme.py nor listed in NOT_RUN: {unaccounted}"
    assert not stale, f"tests/test_readme.py names commands the README no longer has: {stale}"
    assert len(found) == len(run) + len(NOT_RUN)


def test_the_command_reader():
    text = "x\n```bash\ncvig a   # note\n# only a comment\ncvig b \\\n    --c d   # more\ncvig a\n```\n```python\nno\n```\n"
    assert readme_commands(text) == ["cvig a", "cvig b --c d"]


def test_model_list_and_table_match_the_registry():
    """The README's list_models() line and model table: every registered variant, with its parameter count."""
    text = README.read_text()
    listed = re.search(r"clustervig\.list_models\(\)\s+# (\[.*?\])", text).group(1)
    assert json.loads(listed.replace("'", '"')) == clustervig.list_models()
    table = re.search(r"\| name \| blocks .*?\n\n", text, re.S).group(0)
    rows = {m.group(1): m for m in re.finditer(r"^\| `(\w+)`[^|]*\| (\d+) \| (\d+) \|[^|]*\|[^|]*\|[^|]*\| ([\d.]+) M",
                                               table, re.M)}
    assert sorted(rows) == clustervig.list_models()
    for name, m in rows.items():
        model = clustervig.create_model(name)
        if name != "cvig_nano":  # the nano row is the model without its distillation head (tests, demos)
            assert float(m.group(4)) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2), name
        assert (int(m.group(2)), int(m.group(3))) == (model.cfg.depth, model.cfg.dim), name


# ---------------------------------------------------------------------------------------------------------------
# running the scenarios
# ---------------------------------------------------------------------------------------------------------------

def authors_layout(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A clustervig state_dict (G-MRGCN, MLP groups 1) in the key layout of the authors' code: the inverse of
    clustervig.convert.map_state_dict, written out here from the authors' names (tests/fixtures/authors)."""
    out: Dict[str, torch.Tensor] = {}
    c = sd["pos_embed"].shape[1]
    perm = torch.cat([torch.arange(0, 2 * c, 2), torch.arange(1, 2 * c, 2), torch.arange(2 * c, 3 * c)])
    for k, v in sd.items():
        m = re.match(r"stem\.convs\.(\d+)\.([01])\.(.+)$", k)
        b = re.match(r"blocks\.(\d+)\.(grapher|ffn)\.(.+)$", k)
        if m:
            out[f"stem.convs.{3 * int(m.group(1)) + int(m.group(2))}.{m.group(3)}"] = v
        elif not b:
            out[k] = v  # pos_embed, prediction.*, head.*, dist_head.*
        else:
            i, part, rest = int(b.group(1)), b.group(2), b.group(3)
            src = f"backbone.{2 * i + (part == 'ffn')}"
            local = f"{src}.graphconv.layer."
            if rest.startswith("cpe."):
                out[f"{src}.cpe.pe.{rest[4:]}"] = v
            elif rest.startswith(("fc1.", "fc2.")):
                out[f"{src}.{rest}"] = v
            elif rest == "degc.gat.att":
                out[f"{local}nn_centroids.layer.layer.att"] = v.reshape(1, 1, -1)
            elif rest.startswith("degc.gat."):
                out[f"{local}nn_centroids.layer.layer.{rest[9:]}"] = v
            elif rest == "degc.local.nn.0.weight":  # ours [x | r | z'] <- theirs [x0, r0, x1, r1, ..., z']
                w = torch.empty_like(v[:, :, 0, 0])
                w[:, perm] = v[:, :, 0, 0]
                out[f"{local}nn_vertex.layer.lins.0.head_list.0.weight"] = w
            elif rest == "degc.local.nn.0.bias":
                out[f"{local}nn_vertex.layer.lins.0.head_list.0.bias"] = v
            elif rest.startswith("degc.local.nn.1."):
                out[f"{local}nn_vertex.layer.norms.0.module.{rest[16:]}"] = v
            else:
                raise AssertionError(f"no authors' name for {k}")
    return out


def _photo(path: Path, name: str, size: int = 96) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)).save(path)


def setup(name: str, d: Path) -> None:
    """The files a scenario's commands take, as the README's earlier steps or the user would have them."""
    if name == "digits":
        shutil.copy(DIGITS, d / "ck.pth")
        _photo(d / "photo.jpg", "astronaut")
        (d / "more").mkdir()
        _photo(d / "more" / "cat.png", "chelsea")
        _photo(d / "more" / "coffee.png", "coffee")
    elif name == "exports":
        torch.manual_seed(0)
        torch.save(clustervig.create_model("cvig_nano").state_dict(), d / "ck.pth")
    elif name == "int8":
        from clustervig.dataset_cli import write_split

        shutil.copy(DIGITS, d / "ck.pth")
        write_split("digits", "train", d / "calib_images", per_class=3)
    elif name == "convert":
        torch.manual_seed(0)
        nano = clustervig.create_model("cvig_nano").state_dict()
        torch.save(authors_layout(nano), d / "checkpoint.pth")
        torch.save({"state_dict": authors_layout(nano), "epoch": 299}, d / "model_best.pth")  # a training checkpoint
        torch.save(nano, d / "nano_ours.pth")  # for the round-trip check
        shutil.copy(FIX / "authors_small_state.pth", d / "small.pth")
        shutil.copy(FIX / "config.json", d / "small.json")


def check(name: str, d: Path, outputs: Dict[str, str]) -> None:
    """What the scenario's commands must have produced, beyond exit status 0."""
    if name == "help":
        assert "export" in outputs["cvig --help"] and outputs["cvig --version"].startswith("cvig, version ")
        table = re.search(r"### Output of `cvig-profile --table3`\n\n```\n(.*?)```", README.read_text(), re.S).group(1)
        assert outputs["cvig-profile --table3"].strip() == table.strip()  # the README prints the real output
        assert outputs["cvig-profile --checkpoint clustervig/weights/cvig_digits.pth"].startswith(
            "cvig_digits: 0.423 M parameters")
    elif name == "digits":
        assert "PASSED" in outputs["cvig-compare out/model_fp32.onnx --checkpoint ck.pth"]
        bench = json.loads((d / "bench.json").read_text())
        assert [r["batch"] for r in bench["rows"]] == [1]  # the static batch-1 export: its own batch, no skips
        run = outputs["cvig-run out/model_fp32.onnx photo.jpg more/*.png --topk 5"]
        assert [line for line in run.splitlines() if not line.startswith(" ")] == \
            ["photo.jpg", "more/cat.png", "more/coffee.png"]
        assert (d / "triton" / "cvig_digits_onnx" / "config.pbtxt").is_file()
    elif name == "exports":
        assert json.loads((d / "out" / "report.json").read_text())["model"]["name"] == "cvig_nano"
    elif name == "int8":
        acc = outputs["cvig-accuracy out/model_fp32.onnx out/model_fp16.onnx out/model_int8.onnx --checkpoint ck.pth "
                      "--digits"]
        rows = {line.split()[0]: float(line.split()[1].rstrip("%")) for line in acc.splitlines()[1:]}
        assert set(rows) == {"pytorch", "model_fp32.onnx", "model_fp16.onnx", "model_int8.onnx"}
        assert rows["pytorch"] == rows["model_fp32.onnx"] == 99.72 and rows["model_int8.onnx"] >= 98.0, acc
    elif name == "photos":
        assert len(list((d / "calib").rglob("*.png"))) == 16
        report = json.loads((d / "out" / "report.json").read_text())
        assert report["validation"]["labelled_set"]["images"] == 8, report["validation"]["labelled_set"]
    elif name == "convert":
        from clustervig.checkpoint import model_from_checkpoint

        ours = torch.load(d / "nano_ours.pth")
        for path in ("cvig_ti_authors.pth", "cvig_s.pth"):  # the authors' layout converts back to the same tensors
            back = model_from_checkpoint(d / path).state_dict()
            assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours), path
        assert (d / "small_cvig.pth").is_file() and (d / "small.pth").read_bytes() == (FIX / "authors_small_state.pth").read_bytes()
    elif name == "train":
        assert len(list(d.glob("cvig_digits-*.pth"))) == 1 and (d / "d.pth").is_file()


def run_serve(d: Path, env: Dict[str, str]) -> str:
    """`serve models/` until Ctrl-C: started, checked to serve the exported model, then sent SIGINT (Ctrl-C). The
    real server environment where it installs, else the stand-in server of tests/test_triton_local.py (--env)."""
    import urllib.request

    from clustervig.runtime import triton_local

    cmd = [sys.executable, "-m", "clustervig.runtime.triton_local", "serve", "models/"]
    try:
        triton_local.ensure_env(quiet=True)
        real = True
    except triton_local.TritonSetupError:
        from test_triton_local import make_fake_env

        cmd += ["--env", str(make_fake_env(d / "fake-triton-env"))]
        real = False
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("tritonserver (PID "), line + proc.stderr.read()
        http = line.split("HTTP ")[1].split(",")[0]
        if real:
            with urllib.request.urlopen(f"http://{http}/v2/models/cvig_nano_python/ready", timeout=10) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "stopped by SIGINT" in err, err
    return line + out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_readme_commands(name, tmp_path):
    d = tmp_path / name
    d.mkdir()
    setup(name, d)
    # half this worker's share of the cores (conftest): torch threads in a child spin-wait on a busy machine (one
    # digits training epoch took 2 min of CPU with 2 threads beside other jobs, 23 s with one)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", TMPDIR=str(tmp_path),
               OMP_NUM_THREADS=str(max(1, torch.get_num_threads() // 2)))
    outputs: Dict[str, str] = {}
    for readme_cmd, instead in SCENARIOS[name]:
        if instead == "SERVE":
            outputs[readme_cmd] = run_serve(d, env)
            continue
        cmd = (instead or readme_cmd).replace("clustervig/weights/", f"{ROOT}/clustervig/weights/")
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", cmd], cwd=d, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd}\nexit {r.returncode} after {time.monotonic() - t0:.0f} s\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs[readme_cmd] = r.stdout
    check(name, d, outputs)
