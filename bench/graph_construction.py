"""Graph-construction cost vs tokens: one DEGC (k-means + partitioned k-NN) vs ViG's full k-NN.

    python -m bench.graph_construction [--tokens 196,784,3136] [--clusters 1,4,6] [--repeats 5]

For each token count N and cluster count kappa, times (median over interleaved
repeats, batch 8, C = 192, K = 9) in PyTorch eager and ONNX Runtime CPU:

* ``degc-masked``: k-means (T = 20) + masked partitioned k-NN (N x N similarity, masked TopK);
* ``degc-padded``: k-means + padded partitioned k-NN with capacity P = ceil(1.25 N / kappa);
* ``vig-full``: full-image k-NN (kappa = 1, no k-means), as ViG builds its graph.

Peak memory is the analytical size of the largest intermediate tensor (the
similarity matrix), which is what bounds memory for large N, plus the peak
RSS growth measured around the PyTorch call. Writes
bench/results/graph_construction_cpu.json and the "graph" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import tempfile
import time
from typing import Dict, List

import torch
from torch import nn

from clustervig.graph import kmeans, knn_masked, knn_padded, l2_normalize

from .common import machine, summary, time_interleaved, update_section, write_json

C, K, T, B = 192, 9, 20, 8


class GraphBuild(nn.Module):
    def __init__(self, clusters: int, mode: str, capacity: int = 0) -> None:
        super().__init__()
        self.clusters, self.mode, self.capacity = clusters, mode, capacity

    def forward(self, x):
        xn = l2_normalize(x)
        labels = kmeans(xn, self.clusters, T)
        if self.mode == "padded":
            idx, _, _ = knn_padded(xn, labels, K, self.clusters, self.capacity)
        else:
            idx, _ = knn_masked(xn, labels, K)
        return idx


def sim_bytes(n: int, clusters: int, mode: str, capacity: int) -> int:
    if mode == "padded":
        return B * clusters * capacity * capacity * 4
    return B * n * n * 4


def ort_session(module: nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.onnx")
        torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["idx"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def run(tokens: List[int], clusters: List[int], repeats: int, ort: bool) -> Dict:
    rows = []
    for n in tokens:
        torch.manual_seed(0)
        x = torch.randn(B, n, C)
        configs = {"vig-full": (1, "masked", 0)}
        for k in clusters:
            if k == 1:
                continue
            cap = math.ceil(1.25 * n / k)
            configs[f"degc-masked-k{k}"] = (k, "masked", 0)
            configs[f"degc-padded-k{k}"] = (k, "padded", cap)
        mods = {name: GraphBuild(*cfg).eval() for name, cfg in configs.items()}
        fns = {}
        with torch.no_grad():
            for name, m in mods.items():
                fns[f"torch/{name}"] = (lambda m=m: m(x))
                if ort:
                    fns[f"ort/{name}"] = ort_session(m, x)
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            times = time_interleaved(fns, repeats=repeats, warmup=1)
        for key, samples in times.items():
            backend, name = key.split("/", 1)
            k, mode, cap = configs[name]
            rows.append({
                "tokens": n, "backend": backend, "method": name, "clusters": k, "mode": mode,
                "capacity": cap, "batch": B, **summary(samples),
                "similarity_mib": sim_bytes(n, k, mode, cap) / 2**20,
            })
            print(f"N={n:>5} {key:<24} {rows[-1]['median_s']*1e3:9.2f} ms  sim {rows[-1]['similarity_mib']:8.1f} MiB")
        rows.append({"tokens": n, "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024})
    return {"machine": machine(), "C": C, "K": K, "T": T, "batch": B, "rows": rows}


def markdown(res: Dict) -> str:
    rows = [r for r in res["rows"] if "method" in r]
    m = res["machine"]
    lines = [
        "## Graph construction vs tokens: DEGC vs ViG full k-NN (CPU)",
        "",
        f"`python -m bench.graph_construction` — batch {res['batch']}, C = {res['C']}, K = {res['K']}, "
        f"k-means T = {res['T']}; {m['cpu_count']} CPU cores, torch {m['torch']}, onnxruntime {m.get('onnxruntime', '-')}, {m['date']}.",
        "Median over interleaved repeats. `degc-masked` computes the full N×N similarity and masks it (the exported "
        "static form), `degc-padded` only κ·P² similarities (P = ⌈1.25 N/κ⌉), `vig-full` is ViG's full-image k-NN.",
        "",
        "| N | backend | method | median ms | ×ViG | similarity MiB |",
        "|---:|---|---|---:|---:|---:|",
    ]
    base = {(r["tokens"], r["backend"]): r["median_s"] for r in rows if r["method"] == "vig-full"}
    for r in rows:
        ratio = r["median_s"] / base[(r["tokens"], r["backend"])]
        lines.append(f"| {r['tokens']} | {r['backend']} | {r['method']} | {r['median_s']*1e3:.2f} | "
                     f"{ratio:.2f} | {r['similarity_mib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.graph_construction", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="196,784,3136")
    ap.add_argument("--clusters", default="1,4,6")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-ort", action="store_true", help="PyTorch only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run([int(v) for v in args.tokens.split(",")], [int(v) for v in args.clusters.split(",")],
              args.repeats, not args.no_ort)
    res["wall_s"] = time.perf_counter() - t0
    path = write_json("graph_construction_cpu", res)
    update_section("graph", markdown(res))
    print(f"wrote {path} and BENCHMARKS.md ({res['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
