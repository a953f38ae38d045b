"""Parameter and MAC counting for ClusterViG, and the Table III comparison.

Two MAC figures (docs/design.md section 2):

* **paper-comparable**: every convolution and linear layer except the G-GCN
  MLP inside DEGC, which the paper's profiler could not see (it lives inside a
  PyTorch Geometric layer);
* **true**: everything: paper-comparable + the G-GCN MLP + graph
  construction (k-means distances and updates, partitioned k-NN similarities)
  + GATv2 attention.

Convolution and linear MACs are measured with forward hooks on a real forward
pass (on the ``meta`` device by default, so even ``cvig_b_hr`` profiles in a
second). Graph-construction MACs are counted analytically from the shapes the
hooks see; the partitioned k-NN cost assumes balanced partitions
(kappa * (N/kappa)^2 * C, the paper's O(N^2/kappa) claim) unless real labels
are available (``device="cpu"``), in which case the actual partition sizes are
used.

Command line::

    cvig-profile --table3              # the four paper variants vs Table III
    cvig-profile cvig_ti --gcn gin     # one model (its own class count)
    cvig-profile cvig_ti --json        # machine-readable
    cvig-profile --checkpoint ck.pth   # the model a checkpoint holds
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .graph import KMeans, PartitionedKNN
from .gcn import GATv2
from .model import ClusterViG
from .registry import PAPER_TABLE3, create_model


@dataclass
class Profile:
    name: str
    params: int
    macs: Dict[str, float] = field(default_factory=dict)  # component -> MACs per image

    @property
    def paper_macs(self) -> float:
        return sum(v for k, v in self.macs.items() if k not in _NOT_IN_PAPER)

    @property
    def true_macs(self) -> float:
        return sum(self.macs.values())

    def to_dict(self) -> Dict:
        return {
            "name": self.name,
            "params": self.params,
            "params_m": self.params / 1e6,
            "gmacs_paper": self.paper_macs / 1e9,
            "gmacs_true": self.true_macs / 1e9,
            "gmacs_by_component": {k: v / 1e9 for k, v in sorted(self.macs.items())},
        }


_NOT_IN_PAPER = {"ggcn_mlp", "kmeans", "knn", "gat_attention"}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _component(name: str) -> str:
    if ".degc.local." in name:
        return "ggcn_mlp"
    if ".degc.gat." in name:
        return "gat_linear"
    if name.startswith("stem"):
        return "stem"
    if name.startswith("blocks"):
        return "ffn" if ".ffn." in name else "grapher_conv"
    return "head"


def profile_model(model: ClusterViG, batch: int = 1, device: str = "meta") -> Profile:
    """Count parameters and per-image MACs of ``model`` (see module docstring)."""
    cfg = model.cfg
    macs: Dict[str, float] = {}
    handles = []

    def add(key: str, value: float) -> None:
        macs[key] = macs.get(key, 0.0) + value / batch

    def conv_hook(name):
        def hook(mod, inp, out):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            add(_component(name), out.numel() * k)
        return hook

    def linear_hook(name):
        def hook(mod, inp, out):
            add(_component(name), out.numel() * mod.in_features)
        return hook

    def kmeans_hook(mod, inp, out):
        b, n, c = inp[0].shape
        k, t = mod.clusters, mod.iters
        # (T+1) distance matmuls [N,C]x[C,k] plus T one-hot update matmuls
        add("kmeans", b * ((t + 1) * n * k * c + t * n * k * c))

    def knn_hook(mod, inp, out):
        xn, labels = inp
        b, n, c = xn.shape
        if labels.device.type == "meta":
            sizes_sq = b * mod.clusters * (n / mod.clusters) ** 2
        else:
            counts = torch.stack([torch.bincount(l, minlength=mod.clusters) for l in labels])
            sizes_sq = float((counts.double() ** 2).sum())
        add("knn", sizes_sq * c)

    def gat_hook(mod, inp, out):
        z = inp[0]
        b, k, _ = z.shape
        cout = mod.att.numel()
        # a^T LeakyReLU(.) for k*k pairs, then alpha @ W_L z
        add("gat_attention", b * (k * k * cout * 2))

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook(name)))
        elif isinstance(m, KMeans):
            handles.append(m.register_forward_hook(kmeans_hook))
        elif isinstance(m, PartitionedKNN):
            handles.append(m.register_forward_hook(knn_hook))
        elif isinstance(m, GATv2):
            handles.append(m.register_forward_hook(gat_hook))
    was_training = model.training
    model.eval()
    try:
        model_dev = model.to(device)
        x = torch.randn(batch, 3, *cfg.img_hw, device=device)
        with torch.no_grad():
            model_dev(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Profile(cfg.name, count_params(model), macs)


def profile(name: str, gcn: Optional[str] = None, num_classes: Optional[int] = None, **overrides) -> Profile:
    """Profile a named variant without materialising its weights (meta device). ``gcn`` and
    ``num_classes`` default to the variant's own (``cvig_digits``: 10 classes, ``cvig_photos``: 16)."""
    if gcn is not None:
        overrides["gcn"] = gcn
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **overrides)
    return profile_model(model, device="meta")


def profile_checkpoint(checkpoint, name: Optional[str] = None, num_classes: Optional[int] = None,
                       gcn: Optional[str] = None) -> Profile:
    """Profile the model a checkpoint holds, as ``cvig export --checkpoint`` builds it: the variant and class
    count it records (or ``name`` / ``num_classes`` for a plain state_dict), its distillation head or none."""
    from .checkpoint import build_model

    model = build_model(name, checkpoint, num_classes, **({"gcn": gcn} if gcn is not None else {}))
    return profile_model(model, device="meta")


def table3(gcn: str = "mr") -> List[Dict]:
    """Rows comparing our counts with the paper's Table III."""
    rows = []
    for name, ref in PAPER_TABLE3.items():
        p = profile(name, gcn=gcn)
        d = p.to_dict()
        d.update(
            paper_params_m=ref["params_m"],
            paper_gmacs=ref["gmacs"],
            params_err_pct=100 * (d["params_m"] - ref["params_m"]) / ref["params_m"],
            gmacs_err_pct=100 * (d["gmacs_paper"] - ref["gmacs"]) / ref["gmacs"],
        )
        rows.append(d)
    return rows


def format_table3(rows: List[Dict]) -> str:
    head = (
        f"{'model':<10} {'params M':>9} {'paper':>7} {'Δ%':>6} | "
        f"{'GMACs*':>7} {'paper':>6} {'Δ%':>6} | {'true GMACs':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['name']:<10} {r['params_m']:>9.2f} {r['paper_params_m']:>7.1f} {r['params_err_pct']:>+6.2f} | "
            f"{r['gmacs_paper']:>7.2f} {r['paper_gmacs']:>6.1f} {r['gmacs_err_pct']:>+6.2f} | {r['gmacs_true']:>10.2f}"
        )
    lines.append("* paper-comparable: without the G-GCN MLP, as the paper's profiler counted")
    return "\n".join(lines)


def format_profile(p: Profile) -> str:
    d = p.to_dict()
    lines = [f"{p.name}: {d['params_m']:.3f} M parameters",
             f"  GMACs paper-comparable {d['gmacs_paper']:.3f}   true {d['gmacs_true']:.3f}"]
    for k, v in d["gmacs_by_component"].items():
        star = "" if k in _NOT_IN_PAPER else "  (paper-comparable)"
        lines.append(f"    {k:<14} {v:8.4f}{star}")
    return "\n".join(lines)


def _click_command():
    import click

    from .checkpoint import CheckpointError
    from .cliutil import CTX, MODEL_NAME, existing_file, model_help

    @click.command("profile", context_settings=CTX, epilog="""
\b
Examples:
  cvig-profile --table3                           # the four paper variants vs Table III
  cvig-profile --model cvig_ti --gcn gin          # one variant, every component
  cvig-profile --model cvig_b_hr --json
  cvig-profile --checkpoint clustervig/weights/cvig_digits.pth   # the model a checkpoint holds

\b
A variant is profiled as registered (its own class count: cvig_digits 10,
cvig_photos 16, the ImageNet variants 1000) unless --num-classes or --gcn
say otherwise; a --checkpoint as recorded in it (or --model for a plain
state_dict), with or without its distillation head, exactly as cvig export
builds it. Parameters are counted exactly; MACs per image from one forward
pass on the meta device, k-NN with balanced partitions.
""")
    @click.argument("positional_model", metavar="[MODEL]", required=False, type=MODEL_NAME)
    @click.option("--model", "model_name", type=MODEL_NAME, default=None, help=model_help("Variant to profile."))
    @click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                  help="Profile the model this checkpoint holds (its recorded variant and classes; --model for a "
                       "plain state_dict).")
    @click.option("--gcn", type=click.Choice(["mr", "edge", "sage", "gin"]), default=None,
                  help="Local update (default: the variant's or the checkpoint's).")
    @click.option("--num-classes", type=click.IntRange(min=1), default=None,
                  help="Classifier outputs (default: the variant's own, or the checkpoint's).")
    @click.option("--table3", is_flag=True, help="Compare the four paper variants with Table III.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON to stdout instead of a table.")
    def command(positional_model, model_name, checkpoint, gcn, num_classes, table3, as_json):
        """Count parameters and GMACs of ClusterViG variants (true and paper-comparable). Weights are not
        materialised: any variant profiles in seconds."""
        if positional_model and model_name and positional_model != model_name:
            raise click.UsageError(f"two variants given ({positional_model} and --model {model_name}); give one")
        name = model_name or positional_model
        if table3 and (name or checkpoint or num_classes):
            raise click.UsageError("--table3 profiles the four paper variants as registered: give it alone "
                                   "(or with --gcn), or profile one model with --model / --checkpoint")
        if not table3 and not name and checkpoint is None:
            raise click.UsageError("give --model NAME, --checkpoint PATH or --table3")
        if table3:
            rows = table3_rows(gcn or "mr")
            click.echo(json.dumps(rows, indent=2) if as_json else format_table3(rows))
            return
        try:
            if checkpoint is not None:
                existing_file(checkpoint, "checkpoint")
                p = profile_checkpoint(checkpoint, name, num_classes, gcn)
            else:
                p = profile(name, gcn=gcn, num_classes=num_classes)
        except (CheckpointError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(json.dumps(p.to_dict(), indent=2) if as_json else format_profile(p))

    return command


table3_rows = table3  # the option --table3 shadows the function's name inside the command
command = _click_command()


def main(argv: Optional[List[str]] = None) -> int:
    """cvig-profile (also ``cvig profile``); returns the exit status."""
    try:
        command.main(args=argv, prog_name="cvig-profile", standalone_mode=False)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

