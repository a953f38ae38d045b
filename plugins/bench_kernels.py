"""Time each plugin kernel against the PyTorch ops it replaces (needs a CUDA GPU and libcvig_kernels.so).

    python plugins/bench_kernels.py [--batch 64] [--tokens 196] [--dim 192] [--clusters 4] [--k 9] [--fp16]

For one Grapher (defaults: batch 64, N = 196, C = 192, the issue's target
shape) it times, with CUDA events and interleaved repeats: the k-means
kernel vs the unrolled PyTorch k-means, the partitioned k-NN kernel vs the
masked N x N TopK, the gather-max-rel kernel vs gather + amax, and the
Grapher's two 1x1 convolutions (fc1 + fc2) as the yardstick. Writes
bench/results/kernels_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--k", type=int, default=9)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark times CUDA kernels and needs one", file=sys.stderr)
        return 2
    from clustervig.graph import gather_neighbors, kmeans, knn_masked, l2_normalize
    from clustervig.plugins.kernels import Kernels

    kern = Kernels()
    dt = torch.float16 if args.fp16 else torch.float32
    b, n, c, k, kk = args.batch, args.tokens, args.dim, args.clusters, args.k
    x = torch.randn(b, n, c, device="cuda", dtype=dt)
    xn = l2_normalize(x.float()).to(dt)
    labels, _ = kern.kmeans(xn, k, 20)
    idx, _ = kern.partitioned_knn(xn, labels, kk)
    conv1 = torch.nn.Conv2d(c, c, 1).cuda().to(dt)
    conv2 = torch.nn.Conv2d(2 * c, c, 1).cuda().to(dt)
    img = torch.randn(b, c, int(n**0.5), int(n**0.5), device="cuda", dtype=dt)
    img2 = torch.randn(b, 2 * c, int(n**0.5), int(n**0.5), device="cuda", dtype=dt)
    lab64 = labels.long()
    with torch.no_grad():
        res = {
            "kmeans_kernel_ms": cuda_time(lambda: kern.kmeans(xn, k, 20)),
            "kmeans_torch_ms": cuda_time(lambda: kmeans(xn.float(), k, 20)),
            "knn_kernel_ms": cuda_time(lambda: kern.partitioned_knn(xn, labels, kk)),
            "knn_torch_masked_topk_ms": cuda_time(lambda: torch.topk(torch.where(
                lab64[:, :, None] == lab64[:, None, :], xn @ xn.transpose(1, 2), torch.tensor(-1e4, dtype=dt, device="cuda")),
                kk, dim=-1)),
            "gather_max_rel_kernel_ms": cuda_time(lambda: kern.gather_max_rel(x, idx)),
            "gather_max_rel_torch_ms": cuda_time(lambda: gather_neighbors(x, idx.long()).amax(2) - x),
            "grapher_fc1_fc2_convs_ms": cuda_time(lambda: (conv1(img), conv2(img2))),
        }
    res["kmeans_plus_knn_kernels_ms"] = res["kmeans_kernel_ms"] + res["knn_kernel_ms"]
    res["target_met"] = res["kmeans_plus_knn_kernels_ms"] < res["grapher_fc1_fc2_convs_ms"]
    dev = torch.cuda.get_device_name(0)
    out = {"device": dev, "shape": vars(args), "results": res, "torch": torch.__version__}
    print(json.dumps(out, indent=2))
    path = Path(__file__).resolve().parents[1] / "bench" / "results" / f"kernels_{dev.replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
