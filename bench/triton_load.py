"""A real Triton server under load on loopback: throughput, latency and the batches its dynamic batcher forms.

    python -m bench.triton_load [--models cvig_nano,cvig_ti] [--concurrency 1,2,4,8] [--seconds 15]

Each model is exported with ``--dynamic-batch 1:4:8 --triton-backend python``
into one repository, served by nvidia-pytriton's tritonserver 2.51 (Python
backend running ONNX Runtime, ``clustervig.runtime.triton_local``) on
127.0.0.1. At each concurrency C, C client threads (one gRPC client each) send
one-image requests back to back for a fixed time. Reported per point:
requests per second, client-side latency p50 / p95 / max, failed requests,
and from the server's own inference statistics the batch sizes it executed,
the mean queue time per request and the mean compute time per execution.

Client and server share this machine's cores; the figures describe the
serving path (batching, protocol, Python backend), not a GPU server.
Writes bench/results/triton_load.json and the "triton-load" section of BENCHMARKS.md.
"""
from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .common import ints, machine, parser, publish

BATCH = "1:4:8"


def _stats(client, model: str) -> Dict:
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    inf = s["inference_stats"]
    batches = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in s.get("batch_stats", [])}
    return {"requests": int(inf["success"].get("count", 0)), "failed": int(inf["fail"].get("count", 0)),
            "queue_ns": int(inf["queue"].get("ns", 0)), "executions": int(s.get("execution_count", 0)),
            "infer_ns": int(inf["compute_infer"].get("ns", 0)), "batches": batches}


def _delta(after: Dict, before: Dict) -> Dict:
    d = {k: after[k] - before[k] for k in ("requests", "failed", "queue_ns", "executions", "infer_ns")}
    d["batches"] = {b: n - before["batches"].get(b, 0) for b, n in after["batches"].items()
                    if n - before["batches"].get(b, 0) > 0}
    return d


def load_point(server, model: str, x: np.ndarray, concurrency: int, seconds: float) -> Dict:
    """``concurrency`` threads sending one-image requests for ``seconds``; client and server figures."""
    import tritonclient.grpc as tg

    probe = tg.InferenceServerClient(server.grpc_url)
    before = _stats(probe, model)
    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(t: int) -> None:
        client = tg.InferenceServerClient(server.grpc_url)
        inp = tg.InferInput("images", [1, *x.shape[1:]], "FP32")
        out = [tg.InferRequestedOutput("logits")]
        mine, bad = [], []
        start.wait()
        i = t
        while time.perf_counter() < stop_at[0]:
            inp.set_data_from_numpy(x[i % len(x)][None])
            t0 = time.perf_counter()
            try:
                logits = client.infer(model, [inp], outputs=out, client_timeout=120).as_numpy("logits")
                if logits.shape[0] == 1 and np.isfinite(logits).all():
                    mine.append(time.perf_counter() - t0)
                else:
                    bad.append(f"answer of shape {logits.shape}, finite {bool(np.isfinite(logits).all())}")
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                bad.append(repr(exc)[:200])
            i += concurrency
        client.close()
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    server_side = _delta(_stats(probe, model), before)
    probe.close()
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")  # noqa: E731
    return {"model": model, "concurrency": concurrency, "seconds": round(wall, 2), "requests": len(lat),
            "failed": len(failures), "failures": failures[:5], "throughput_rps": len(lat) / wall,
            "p50_ms": q(0.50) * 1e3, "p95_ms": q(0.95) * 1e3, "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
            "mean_ms": statistics.fmean(lat) * 1e3 if lat else float("nan"), "server": server_side}


def run(names: Sequence[str], concurrency: Sequence[int], seconds: float) -> Dict:
    from click.testing import CliRunner

    import clustervig
    from clustervig.export.cli import main as export_main
    from clustervig.preprocess import sample_photographs, transform_spec
    from clustervig.runtime.triton_local import SERVER_REQUIREMENTS, LocalTriton, ensure_env

    env = ensure_env()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        inputs = {}
        for name in names:
            res = CliRunner().invoke(export_main, ["--model", name, "--dynamic-batch", BATCH, "--no-validate",
                                                   "--triton-repo", str(repo), "--triton-backend", "python",
                                                   "-o", str(Path(tmp) / name)])
            if res.exit_code != 0:
                raise SystemExit(f"cvig export of {name} failed:\n{res.output}")
            inputs[name] = sample_photographs(transform_spec(clustervig.get_config(name))).numpy()
        with LocalTriton(repo, env) as server:
            print(f"[triton-load] tritonserver PID {server.pid} on {server.grpc_url}", flush=True)
            for name in names:
                model = f"{name}_python"
                load_point(server, model, inputs[name], 2, min(3.0, seconds))  # warm-up: sessions, threads
                for c in concurrency:
                    r = load_point(server, model, inputs[name], c, seconds)
                    rows.append(r)
                    print(f"[triton-load] {model:<18} C={c:<2} {r['throughput_rps']:6.1f} req/s  p50 {r['p50_ms']:7.1f} ms"
                          f"  p95 {r['p95_ms']:7.1f} ms  failed {r['failed']}  batches {r['server']['batches']}",
                          flush=True)
    return {"machine": machine(), "server": list(SERVER_REQUIREMENTS), "batch": BATCH, "seconds": seconds,
            "rows": rows}


def _batches(row: Dict) -> Dict[int, int]:
    """Executions per batch size (JSON keeps the sizes as strings)."""
    return {int(b): int(n) for b, n in row["server"]["batches"].items()}


def _mean_batch(row: Dict) -> float:
    return sum(b * n for b, n in _batches(row).items()) / max(1, row["server"]["executions"])


def markdown(res: Dict) -> str:
    m = res["machine"]
    lines = [
        "## Triton Inference Server under load (loopback, Python backend)",
        "",
        f"`python -m bench.triton_load` — {m['date']}, {m['cpu_count']} CPU cores shared by the server and the "
        f"clients; server {', '.join(res['server'])} (tritonserver 2.51, Python backend running ONNX Runtime on the "
        f"FP32 graph); models exported with `--dynamic-batch {res['batch']} --triton-backend python` (preferred "
        "batch 4, at most 8, queue delay 100 µs). C client threads (gRPC) send one-image requests back to back for "
        f"{res['seconds']:.0f} s per row. Latency is the client's (request to response); batches, queue and "
        "compute come from the server's inference statistics for exactly those requests.",
        "",
        "| model | C | req/s | p50 ms | p95 ms | max ms | failed | batches executed (size×count) | mean batch | "
        "queue ms/request | compute ms/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        s = r["server"]
        execs = max(1, s["executions"])
        batches = ", ".join(f"{b}×{n}" for b, n in sorted(_batches(r).items()))
        mean_batch = _mean_batch(r)
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['max_ms']:.1f} | {r['failed']} | {batches} | {mean_batch:.2f} | "
                     f"{s['queue_ns'] / max(1, s['requests']) / 1e6:.1f} | {s['infer_ns'] / execs / 1e6:.1f} |")
    lines.append("")
    per_image = lambda r: r["server"]["infer_ns"] / max(1, r["server"]["requests"]) / 1e6  # noqa: E731
    for model in dict.fromkeys(r["model"] for r in res["rows"]):
        rows = sorted((r for r in res["rows"] if r["model"] == model), key=lambda r: r["concurrency"])
        lo, hi = rows[0], rows[-1]
        lines.append(f"- `{model}`: C = {lo['concurrency']} → {hi['concurrency']}: "
                     f"{lo['throughput_rps']:.1f} → {hi['throughput_rps']:.1f} req/s "
                     f"({hi['throughput_rps'] / lo['throughput_rps']:.2f}×), mean batch {_mean_batch(lo):.2f} → "
                     f"{_mean_batch(hi):.2f}, server compute per image {per_image(lo):.1f} → {per_image(hi):.1f} ms, "
                     f"p50 {lo['p50_ms']:.0f} → {hi['p50_ms']:.0f} ms; "
                     f"{sum(r['failed'] for r in rows)} failed of {sum(r['requests'] + r['failed'] for r in rows)} requests.")
    lines += ["", "The client threads and the server share the machine's cores, so the server's compute per image "
              "rises with C: the rows show how the repository's dynamic batching and queueing behave under concurrent "
              "clients, not what a dedicated server sustains."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser("python -m bench.triton_load", __doc__)
    ap.add_argument("--models", default="cvig_nano,cvig_ti")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args(argv)
    import clustervig
    from clustervig.runtime.triton_local import TritonSetupError

    names = [s for s in args.models.split(",") if s]
    bad = [s for s in names if s not in clustervig.list_models()]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {clustervig.list_models()}")
    levels = ints(args.concurrency)
    if not levels or min(levels) < 1 or args.seconds <= 0:
        raise SystemExit("--concurrency needs integers >= 1 and --seconds a positive number")
    try:
        res = run(names, levels, args.seconds)
    except TritonSetupError as exc:
        raise SystemExit(f"the Triton server could not be set up or started: {exc}") from None
    publish("triton_load", "triton-load", res, markdown)
    failed = sum(r["failed"] for r in res["rows"])
    if failed:
        print(f"{failed} request(s) failed: see bench/results/triton_load.json", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
