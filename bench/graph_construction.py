"""Graph-construction cost vs tokens: one DEGC (k-means + partitioned k-NN) vs ViG's full k-NN.

    python -m bench.graph_construction [--tokens 196,784,3136] [--clusters 1,4,6] [--repeats 5]

For each token count N and cluster count kappa, times (median over interleaved
repeats, batch 8, C = 192, K = 9) in PyTorch eager and ONNX Runtime CPU:

* ``degc-masked``: k-means (T = 20) + masked partitioned k-NN (N x N similarity, masked TopK);
* ``degc-padded``: k-means + padded partitioned k-NN with capacity P = ceil(1.25 N / kappa);
* ``vig-full``: full-image k-NN (kappa = 1, no k-means), as ViG builds its graph.

Peak memory: the analytical size of the largest intermediate tensor (the
similarity matrix), which bounds memory for large N, and the measured peak
RSS growth of one call, each (N, method, backend) in a fresh process (the
high-water mark of a process cannot be reset): the child builds the module or
loads the ONNX session and the input, records ru_maxrss, runs once and
records it again. Writes bench/results/graph_construction_cpu.json and the
"graph" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
from torch import nn

from clustervig.graph import kmeans, knn_masked, knn_padded, l2_normalize

from .common import ROOT, ints, machine, ms, parser, publish, status_kib, summary, time_interleaved

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


def export_graph(module: nn.Module, x: torch.Tensor, path: str) -> None:
    torch.onnx.export(module, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["idx"])


def ort_session(module: nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.onnx")
        export_graph(module, x, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


def _child_peak(n: int, clusters: int, mode: str, capacity: int, onnx_path: Optional[str]) -> Dict:
    """In a fresh process: set up, then the peak RSS growth of one call (KiB)."""
    torch.manual_seed(0)
    x = torch.randn(B, n, C)
    if onnx_path:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        call = lambda: sess.run(None, feed)  # noqa: E731
    else:
        m = GraphBuild(clusters, mode, capacity).eval()
        call = lambda: m(x)  # noqa: E731
    before = _reset_peak_rss()
    with torch.no_grad():
        call()
    return {"rss_before_kib": before, "rss_peak_kib": _peak_rss_kib()}


def _peak_rss_kib() -> int:
    # VmHWM belongs to this process's address space; ru_maxrss is not usable here because Linux carries
    # the parent's high-water mark into a forked-and-exec'd child.
    hwm = status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> int:
    """Reset the high-water mark to the current RSS (Linux clear_refs 5) so import peaks do not hide the call's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmRSS") or _peak_rss_kib()
    except OSError:
        return _peak_rss_kib()


def peak_memory_mib(n: int, clusters: int, mode: str, capacity: int, backend: str, workdir: str) -> float:
    onnx_path = ""
    if backend == "ort":
        torch.manual_seed(0)
        onnx_path = os.path.join(workdir, f"g_{n}_{clusters}_{mode}.onnx")
        export_graph(GraphBuild(clusters, mode, capacity).eval(), torch.randn(B, n, C), onnx_path)
    cmd = [sys.executable, "-m", "bench.graph_construction", "--child", json.dumps([n, clusters, mode, capacity, onnx_path])]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"memory child failed: {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return (out["rss_peak_kib"] - out["rss_before_kib"]) / 1024


def run(tokens: List[int], clusters: List[int], repeats: int, ort: bool, memory: bool = True) -> Dict:
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
            times = time_interleaved(fns, repeats=repeats, warmup=1)
        with tempfile.TemporaryDirectory() as workdir:
            for key, samples in times.items():
                backend, name = key.split("/", 1)
                k, mode, cap = configs[name]
                rows.append({
                    "tokens": n, "backend": backend, "method": name, "clusters": k, "mode": mode,
                    "capacity": cap, "batch": B, **summary(samples),
                    "similarity_mib": sim_bytes(n, k, mode, cap) / 2**20,
                    "peak_rss_growth_mib": peak_memory_mib(n, k, mode, cap, backend, workdir) if memory else None,
                })
                r = rows[-1]
                peak = f"{r['peak_rss_growth_mib']:8.1f}" if memory else "       -"
                print(f"[graph] N={n:>5} {key:<24} {r['median_s']*1e3:9.2f} ms  sim {r['similarity_mib']:8.1f} MiB  "
                      f"peak +{peak} MiB", flush=True)
    return {"machine": machine(), "C": C, "K": K, "T": T, "batch": B, "repeats": repeats, "rows": rows}


def markdown(res: Dict) -> str:
    rows = [r for r in res["rows"] if "method" in r]
    m = res["machine"]
    lines = [
        "## Graph construction vs tokens: DEGC vs ViG full k-NN (CPU)",
        "",
        f"`python -m bench.graph_construction` — batch {res['batch']}, C = {res['C']}, K = {res['K']}, "
        f"k-means T = {res['T']}; {m['cpu_count']} CPU cores, torch {m['torch']}, onnxruntime {m.get('onnxruntime', '-')}, {m['date']}.",
        f"Median (min–max) over {res.get('repeats', '?')} interleaved repeats. `degc-masked` computes the full N×N "
        "similarity and masks it (the exported static form), `degc-padded` only κ·P² similarities (P = ⌈1.25 N/κ⌉), "
        "`vig-full` is ViG's full-image k-NN. Peak memory: measured RSS growth of one call in a fresh process, next to "
        "the size of the similarity tensor.",
        "",
        "| N | backend | method | ms | ×ViG time | similarity MiB | peak RSS +MiB | ×ViG peak |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    base = {(r["tokens"], r["backend"]): r for r in rows if r["method"] == "vig-full"}
    for r in rows:
        v = base[(r["tokens"], r["backend"])]
        peak, vpeak = r.get("peak_rss_growth_mib"), v.get("peak_rss_growth_mib")
        peak_s = "–" if peak is None else f"{peak:.1f}"
        pratio = "–" if not peak or not vpeak else f"{peak / vpeak:.2f}"
        lines.append(f"| {r['tokens']} | {r['backend']} | {r['method']} | {ms(r)} | "
                     f"{r['median_s'] / v['median_s']:.2f} | {r['similarity_mib']:.1f} | {peak_s} | {pratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.graph_construction", __doc__)
    ap.add_argument("--tokens", default="196,784,3136")
    ap.add_argument("--clusters", default="1,4,6")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-ort", action="store_true", help="PyTorch only")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-configuration peak-memory processes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child_peak(*json.loads(args.child))))
        return 0
    t0 = time.perf_counter()
    res = run(ints(args.tokens), ints(args.clusters), args.repeats, not args.no_ort, not args.no_memory)
    res["wall_s"] = time.perf_counter() - t0
    publish("graph_construction_cpu", "graph", res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
