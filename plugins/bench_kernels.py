"""Time each plugin kernel against the PyTorch ops it replaces (needs a CUDA GPU and libcvig_kernels.so).

    python plugins/bench_kernels.py                       # the acceptance cases below, with their goals
    python plugins/bench_kernels.py --batch 8 --tokens 784 --dim 640 --clusters 6 --k 9 [--fp16]   # one shape
    options: --repeats 30 --inner 20 --budget SECONDS --out PATH

Acceptance cases (the shapes one Grapher sees), FP16 and FP32 each:

  cvig_ti DEGC    B = 64, N = 196, C = 192, kappa = 4, K = 9
                  goal: k-means + k-NN kernels take less GPU time than the Grapher's
                  two 1x1 convolutions (fc1 C -> C, fc2 2C -> C) at FP16
  cvig_b_hr DEGC  B = 1,  N = 784, C = 640, kappa = 6, K = 9
                  goal: the k-means kernel (20 iterations) takes <= 50 us

Per case: the k-means kernel vs the unrolled PyTorch k-means of the static
form, the partitioned k-NN kernel vs the masked N x N TopK, the segment-mean
kernel vs the one-hot matmul, the gather-max-rel kernel vs the running
gather-max, and the two convolutions as the yardstick.

Two times per op, medians over ``--repeats`` interleaved rounds:
``gpu_us``, GPU time per call: ``--inner`` calls captured in one CUDA graph,
replayed between two CUDA events (no launch overhead: at B = 1 a ctypes launch
costs more CPU time than the k-means kernel takes on the GPU, and a TensorRT
engine or CUDA graph does not pay it); ``eager_us``: ``--inner`` plain calls
between two events (launches included). Writes bench/results/kernels_<device>.json
(or ``--out``) after every case, so a crash keeps the cases before it; ``--budget``
stops starting cases once the time is up (they are recorded as skipped).

Importing this file needs no torch (``python -m bench.gpu_acceptance`` runs :func:`run_plan`
with CPU stand-ins on a machine without a GPU); the measuring functions import it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
KMEANS_ITERS = 20
GOAL_KMEANS_US = 50.0  # cvig_b_hr DEGC k-means kernel at batch 1 (also in bench/gpu_acceptance.py)

# name, batch, tokens, dim, clusters, K
CASES = [
    ("cvig_ti DEGC", 64, 196, 192, 4, 9),
    ("cvig_b_hr DEGC", 1, 784, 640, 6, 9),
]
DTYPES = ("fp16", "fp32")
# one case of a plan: name, batch, tokens, dim, clusters, K, dtype ("fp16" / "fp32")
Case = Tuple[str, int, int, int, int, int, str]


def default_plan() -> List[Case]:
    """The acceptance cases, FP16 and FP32 each."""
    return [(*case, dt) for case in CASES for dt in DTYPES]


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _torch_kmeans(xn, k: int, iters: int, init):
    # The static form's k-means (clustervig.graph.kmeans) with its initial
    # indices made once outside: graph.kmeans builds them with torch.tensor(),
    # a host-to-device copy that CUDA-graph capture refuses.
    import torch

    from clustervig.graph import kmeans_assign, one_hot

    centroids = xn.index_select(1, init)
    for _ in range(iters):
        labels = kmeans_assign(xn, centroids)
        onehot = one_hot(labels, k, xn.dtype)
        counts = onehot.sum(dim=1).unsqueeze(-1)
        sums = torch.matmul(onehot.transpose(1, 2), xn)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1.0), centroids)
    return kmeans_assign(xn, centroids)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def time_ops(fns: Dict[str, Callable[[], object]], repeats: int, inner: int) -> Dict[str, Dict]:
    """{name: {"gpu_us", "eager_us", "error"}}: see the module docstring; rounds interleave the ops."""
    import torch

    out: Dict[str, Dict] = {name: {"gpu_us": None, "eager_us": None} for name in fns}
    graphs: Dict[str, object] = {}
    broken = set()
    side = torch.cuda.Stream()
    for name, fn in fns.items():
        try:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream: library loads, workspaces
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - recorded per op, the others still run
            out[name]["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            broken.add(name)
            continue
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            graphs[name] = g
        except Exception as exc:  # noqa: BLE001 - eager time only
            out[name]["error"] = f"CUDA-graph capture failed ({type(exc).__name__}: {_first_line(exc)}): eager time only"
    torch.cuda.synchronize()
    samples: Dict[str, Dict[str, List[float]]] = {name: {"gpu": [], "eager": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            for kind in ("gpu", "eager"):
                if name in broken or (kind == "gpu" and name not in graphs):
                    continue
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                if kind == "gpu":
                    graphs[name].replay()
                else:
                    for _ in range(inner):
                        fn()
                b.record()
                b.synchronize()
                samples[name][kind].append(a.elapsed_time(b) * 1e3 / inner)
    for name, s in samples.items():
        for kind in ("gpu", "eager"):
            if s[kind]:
                out[name][f"{kind}_us"] = round(statistics.median(s[kind]), 2)
    return out


def run_case(kern, name: str, b: int, n: int, c: int, k: int, kk: int, dtype: str, repeats: int,
             inner: int) -> Dict:
    """Times of every op at one shape; ``dtype`` "fp16" or "fp32"."""
    import torch

    from clustervig.graph import gather_max, kmeans_init_indices, l2_normalize, segment_mean

    dtype_name, dtype = dtype, {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, n, c, device=dev, generator=g).to(dtype)
    xn = l2_normalize(x.float()).to(dtype)
    labels, _ = kern.kmeans(xn, k, KMEANS_ITERS)
    idx, _ = kern.partitioned_knn(xn, labels, kk)
    lab64, idx64 = labels.long(), idx.long()
    init = torch.tensor(kmeans_init_indices(n, k), device=dev)
    side = int(round(n**0.5))
    conv1 = torch.nn.Conv2d(c, c, 1).to(dev, dtype)
    conv2 = torch.nn.Conv2d(2 * c, c, 1).to(dev, dtype)
    img = torch.randn(b, c, side, side, device=dev, generator=g).to(dtype)
    img2 = torch.randn(b, 2 * c, side, side, device=dev, generator=g).to(dtype)
    fill = torch.tensor(-1e4, dtype=dtype, device=dev)

    def knn_masked_topk():
        sim = torch.where(lab64[:, :, None] == lab64[:, None, :], xn @ xn.transpose(1, 2), fill)
        return torch.topk(sim, kk, dim=-1)

    fns = {
        "kmeans_kernel": lambda: kern.kmeans(xn, k, KMEANS_ITERS),
        "kmeans_torch": lambda: _torch_kmeans(xn, k, KMEANS_ITERS, init),
        "knn_kernel": lambda: kern.partitioned_knn(xn, labels, kk),
        "knn_torch_masked_topk": knn_masked_topk,
        "segment_mean_kernel": lambda: kern.segment_mean(x, labels, k),
        "segment_mean_torch": lambda: segment_mean(x, lab64, k),
        "gather_max_rel_kernel": lambda: kern.gather_max_rel(x, idx),
        "gather_max_rel_torch": lambda: gather_max(x, idx64) - x,
        "grapher_fc1_fc2_convs": lambda: (conv1(img), conv2(img2)),
    }
    with torch.inference_mode():
        times = time_ops(fns, repeats, inner)
    res = {**case_entry((name, b, n, c, k, kk, dtype_name)), "times_us": times}
    km, nn_, cv = (times[o]["gpu_us"] for o in ("kmeans_kernel", "knn_kernel", "grapher_fc1_fc2_convs"))
    if km is not None and nn_ is not None:
        res["kmeans_plus_knn_kernels_gpu_us"] = round(km + nn_, 2)
        if cv is not None:
            res["kmeans_plus_knn_faster_than_convs"] = km + nn_ < cv
    return res


def _gpu_us(case: Dict, op: str) -> Optional[float]:
    return (case.get("times_us", {}).get(op) or {}).get("gpu_us")


def goals(cases: List[Dict]) -> List[Dict]:
    """The two kernel goals, judged on GPU time (bench/gpu_acceptance.py reaches the same verdicts)."""
    out = []
    ti = [c for c in cases if c["name"] == "cvig_ti DEGC" and c["dtype"] == "fp16" and c["shape"]["batch"] == 64]
    if ti:
        c = ti[0]
        out.append({"goal": "cvig_ti DEGC B=64 FP16: k-means + k-NN kernels < Grapher fc1 + fc2 convs",
                    "measured_us": c.get("kmeans_plus_knn_kernels_gpu_us"),
                    "target_us": _gpu_us(c, "grapher_fc1_fc2_convs"),
                    "met": c.get("kmeans_plus_knn_faster_than_convs")})
    hr = [c for c in cases if c["name"] == "cvig_b_hr DEGC" and c["shape"]["batch"] == 1]
    if hr:
        per = {c["dtype"]: _gpu_us(c, "kmeans_kernel") for c in hr}
        known = [v for v in per.values() if v is not None]
        if any(v > GOAL_KMEANS_US for v in known):
            met = False
        else:
            met = True if known and len(known) == len(per) else None
        out.append({"goal": f"cvig_b_hr DEGC B=1: k-means kernel <= {GOAL_KMEANS_US:g} us",
                    "measured_us": per, "target_us": GOAL_KMEANS_US, "met": met})
    return out


def case_entry(case: Case) -> Dict:
    """The identifying part of a case's result (name, dtype, shape), with no times yet."""
    name, b, n, c, k, kk, dtype = case
    return {"name": name, "dtype": dtype,
            "shape": {"batch": b, "tokens": n, "dim": c, "clusters": k, "k": kk, "kmeans_iters": KMEANS_ITERS},
            "times_us": {}}


def run_plan(plan: Sequence[Case], run_one: Callable[[Case], Dict], soft_deadline: Optional[float] = None,
             on_case: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Run every case of ``plan`` with ``run_one``; returns the case results in plan order.

    A case that raises is recorded with its error and the others still run. With ``soft_deadline``
    (``time.time()`` seconds) no case is started that the previous one's duration says would end after
    it: those are recorded as ``"skipped": "budget"``, so a time limit never loses the cases measured.
    ``on_case(cases so far)`` runs after each case (the callers write their results file there).
    """
    cases: List[Dict] = []
    last_s = 0.0
    for case in plan:
        if soft_deadline is not None and time.time() + last_s > soft_deadline:
            res = {**case_entry(case), "skipped": "budget"}
            print(f"[kernels] {res['name']} {res['dtype']}: skipped (budget)", flush=True)
        else:
            t0 = time.time()
            res = _run_logged(case, run_one)
            last_s = time.time() - t0
        cases.append(res)
        if on_case is not None:
            on_case(cases)
    return cases


def _run_logged(case: Case, run_one: Callable[[Case], Dict]) -> Dict:
    name, b, n, c, k, kk, dtype = case
    print(f"[kernels] {name} B={b} N={n} C={c} kappa={k} K={kk} {dtype} ...", flush=True)
    try:
        res = run_one(case)
    except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
        res = {**case_entry(case), "error": f"{type(exc).__name__}: {_first_line(exc)}"}
        print(f"[kernels]   failed: {res['error']}", flush=True)
    for op, t in res["times_us"].items():
        extra = f"  ({t['error']})" if t.get("error") else ""
        print(f"[kernels]   {op:<24} gpu {t['gpu_us']} us   eager {t['eager_us']} us{extra}", flush=True)
    return res


def header(lib_path: str, repeats: int, inner: int) -> Dict:
    """What the results file says about the run before its cases: device, versions, library, settings."""
    import torch

    return {
        "device": torch.cuda.get_device_name(0),
        "capability": "%d.%d" % torch.cuda.get_device_capability(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "library": lib_path,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "inner": inner,
    }


def report(head: Dict, cases: List[Dict]) -> Dict:
    return {**head, "cases": cases, "goals": goals(cases)}


def _plan_from_args(args) -> List[Case]:
    shape = (args.batch, args.tokens, args.dim, args.clusters, args.k)
    if all(v is None for v in shape):
        return default_plan()
    d = dict(zip(("batch", "tokens", "dim", "clusters", "k"), (64, 196, 192, 4, 9)))
    d.update({key: v for key, v in zip(d, shape) if v is not None})
    return [("custom", d["batch"], d["tokens"], d["dim"], d["clusters"], d["k"], "fp16" if args.fp16 else "fp32")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--clusters", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--fp16", action="store_true", help="one shape: FP16 inputs (the cases run both)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed CUDA graph / eager loop")
    ap.add_argument("--budget", type=float, help="seconds: start no case after this (the rest are recorded as skipped)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels_<device>.json)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark times CUDA kernels and needs one", file=sys.stderr)
        return 2
    from clustervig.plugins.kernels import Kernels, cuda_library
    from clustervig.utils import write_json_atomic

    lib = cuda_library()  # fail here, with the library's path in the message, not inside a timing loop
    kern = Kernels()
    head = header(str(lib.path), args.repeats, args.inner)
    path = args.out or ROOT / "bench" / "results" / f"kernels_{device_slug(head['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget if args.budget is not None else None
    cases = run_plan(_plan_from_args(args), lambda case: run_case(kern, *case, args.repeats, args.inner), deadline,
                     on_case=lambda done: write_json_atomic(path, report(head, done)))
    out = report(head, cases)
    write_json_atomic(path, out)
    for gl in out["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[gl["met"]]
        print(f"[kernels] goal: {gl['goal']}: {verdict} (measured {gl['measured_us']} us, target {gl['target_us']} us)")
    print(f"[kernels] wrote {path}")
    failed = [f"{c['name']} {c['dtype']}" for c in cases if c.get("error")]
    if failed:
        print(f"[kernels] failed cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
