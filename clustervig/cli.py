"""``cvig``: one command with a subcommand per job. Each subcommand is the same click command as its
``cvig-<name>`` entry point, a thin layer over the library (imported only when it runs)."""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import click

from .cliutil import CTX

# name -> (module, attribute, one-line summary shown by `cvig --help` without importing the module)
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "export": ("clustervig.export.cli", "main", "Checkpoint -> validated ONNX (FP32/FP16/INT8/plugins), TensorRT engines."),
    "compare": ("clustervig.export.compare", "main", "Compare artifacts with each other and PyTorch (Polygraphy)."),
    "run": ("clustervig.runtime.cli", "run_main", "Classify images with an exported model (.onnx or engine)."),
    "bench": ("clustervig.runtime.cli", "bench_main", "Latency and throughput per batch size (Table VI layout)."),
    "accuracy": ("clustervig.calib.accuracy", "main", "Top-1 and agreement of artifacts on labelled images."),
    "profile": ("clustervig.profile", "command", "Parameters and GMACs of the variants (Table III)."),
    "train-digits": ("clustervig.train", "command", "Train the digits model on the CPU (minutes)."),
    "train-photos": ("clustervig.train", "photos_command", "Train the 224-px cvig_photos model on the CPU (~30 min)."),
    "dataset": ("clustervig.dataset_cli", "command", "Write a split of the digits / photo-patches data as an image folder."),
    "convert": ("clustervig.convert", "command", "Checkpoint of the authors' ClusterViG code -> clustervig checkpoint."),
    "doctor": ("clustervig.target.doctor", "command", "Versions, libraries and a self-test of this machine (run it first)."),
    "build-plugins": ("clustervig.target.build_plugins", "command",
                      "Build the CUDA kernels and TensorRT plugins here from the installed sources."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx) -> List[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings=CTX, epilog="""
\b
Examples:
  cvig export --checkpoint clustervig/weights/cvig_digits.pth --fp16 -o out/
  cvig compare out/model_fp32.onnx out/model_fp16.onnx --atol 0.05 --rtol 0.05
  cvig run out/model_fp16.onnx scan.png --topk 3
  cvig bench out/model_fp32.onnx --batch 1,8
  cvig export --help

\b
Conventions: --model NAME (variant), --checkpoint PATH (weights), exported
files as arguments, --json prints JSON to stdout, -o/--output PATH writes
a file (a folder for export), --plugins-lib PATH for libcvig_plugins.so.
Each subcommand is also installed as cvig-<name> (cvig-export, cvig-run, ...).
""")
@click.version_option(package_name="clustervig-trt", prog_name="cvig")
def cvig() -> None:
    """ClusterViG from PyTorch to validated ONNX and TensorRT engines."""


def main() -> None:
    cvig()


if __name__ == "__main__":
    main()
