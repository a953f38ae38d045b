"""PNG plots of the suite's JSON results (matplotlib, no display needed).

    python -m bench.plots            # redraw from bench/results/*.json

* speed_vs_batch.png — whole-model throughput vs batch, ClusterViG (solid) vs ViG baseline (dashed), per backend;
* graph_time_vs_n.png — one graph construction's time vs tokens N (log-log), PyTorch and ONNX Runtime;
* memory_vs_n.png — peak memory growth of one graph construction vs N, with the similarity tensor's size;
* tokens_vs_n.png — whole-model latency at batch 1 vs N: masked and padded ClusterViG vs ViG baseline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from . import common


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install -e '.[bench]' (or skip them: --only graph,models,gpu,claims)") from None


def _plt():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, name: str) -> Path:
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path = common.RESULTS / name
    tmp = path.with_name(f".{name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def speed_vs_batch(models: Dict) -> Optional[Path]:
    rows = models.get("throughput") or []
    if not rows:
        return None
    plt = _plt()
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {b: plt.cm.tab10(i) for i, b in enumerate(backends)}
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for bk in backends:
            for fam, style in (("cvig", "-"), ("vig", "--")):
                pts = sorted((r["batch"], r["throughput_img_s"]) for r in rows
                             if r["size"] == size and r["backend"] == bk and r["family"] == fam)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[bk], label=f"{fam}_{size} {bk}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.set_title(f"{size}: ClusterViG (solid) vs ViG baseline (dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, "speed_vs_batch.png")


def _graph_rows(graph: Dict) -> List[Dict]:
    return [r for r in graph.get("rows", []) if "method" in r]


def _loglog_per_backend(rows: List[Dict], name: str, title: str, ylabel: str, draw, legend: int = 8) -> Path:
    """One log-log panel per backend; ``draw(ax, backend_rows)`` plots the lines of a panel."""
    plt = _plt()
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(backends), figsize=(6 * len(backends), 4.2), squeeze=False)
    for ax, bk in zip(axes[0], backends):
        draw(ax, [r for r in rows if r["backend"] == bk])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["tokens"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_locator(_plt().NullLocator())
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {bk}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=legend)
    return _save(fig, name)


def _lines(ax, rows: List[Dict], key: str, dashed_if) -> None:
    for label in dict.fromkeys(r[key] for r in rows):
        pts = sorted((r["tokens"], r["median_s"] * 1e3) for r in rows if r[key] == label)
        ax.plot(*zip(*pts), "--" if dashed_if(label) else "-", marker="o", label=label)


def graph_time_vs_n(graph: Dict) -> Optional[Path]:
    rows = _graph_rows(graph)
    if not rows:
        return None
    return _loglog_per_backend(rows, "graph_time_vs_n.png", "graph construction",
                               "ms per graph construction (batch %d)" % graph.get("batch", 0),
                               lambda ax, sel: _lines(ax, sel, "method", lambda m: m == "vig-full"))


def memory_vs_n(graph: Dict) -> Optional[Path]:
    rows = [r for r in _graph_rows(graph) if r.get("peak_rss_growth_mib") is not None]
    if not rows:
        return None
    plt = _plt()

    def draw(ax, sel):
        for i, method in enumerate(dict.fromkeys(r["method"] for r in sel)):
            n, peak, sim = zip(*sorted((r["tokens"], r["peak_rss_growth_mib"], r["similarity_mib"])
                                       for r in sel if r["method"] == method))
            color = plt.cm.tab10(i)
            ax.plot(n, [max(p, 0.1) for p in peak], "-", marker="o", color=color, label=f"{method} peak RSS growth")
            ax.plot(n, sim, ":", color=color, label=f"{method} similarity tensor")

    return _loglog_per_backend(rows, "memory_vs_n.png", "graph construction memory", "MiB", draw, legend=6)


def tokens_vs_n(models: Dict) -> Optional[Path]:
    rows = models.get("tokens") or []
    if not rows:
        return None
    return _loglog_per_backend(rows, "tokens_vs_n.png", "whole model vs tokens", "ms per image (batch 1)",
                               lambda ax, sel: _lines(ax, sel, "model", lambda m: m.startswith("vig")))


def draw_all(models: Optional[Dict], graph: Optional[Dict]) -> List[Path]:
    out = []
    if models:
        out += [speed_vs_batch(models), tokens_vs_n(models)]
    if graph:
        out += [graph_time_vs_n(graph), memory_vs_n(graph)]
    return [p for p in out if p is not None]


def markdown(paths: List[Path]) -> str:
    rel = lambda p: p.relative_to(common.BENCHMARKS_MD.parent) if p.is_relative_to(common.BENCHMARKS_MD.parent) else p  # noqa: E731
    lines = ["## Plots", "", "`python -m bench.plots` (also run by `python -m bench`), from the JSON results.", ""]
    lines += [f"![{p.stem}]({rel(p)})" for p in paths]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = common.parser("python -m bench.plots", __doc__)
    ap.parse_args(argv)
    paths = draw_all(common.read_json("models_cpu"), common.read_json("graph_construction_cpu"))
    common.update_section("plots", markdown(paths))
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
