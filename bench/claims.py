"""The paper's efficiency claims, checked against this machine's measurements (generated text).

    python -m bench.claims      # from bench/results/{models_cpu,graph_construction_cpu}.json

Every number in the section comes from the JSON results; the verdict of each
claim is computed from them with one rule: ClusterViG is "faster" where the
ViG baseline takes >= 1.10x its time, "slower" where <= 0.95x, else "on par".
"""
from __future__ import annotations

from typing import Dict, List, Optional

from . import common
from .models import ratio_table, token_ratios

FASTER, SLOWER = 1.10, 0.95


def verdict(speedup: float) -> str:
    return "faster" if speedup >= FASTER else ("slower" if speedup <= SLOWER else "on par")


def graph_claim(graph: Dict) -> List[str]:
    rows = [r for r in graph["rows"] if "method" in r]
    vig = {(r["tokens"], r["backend"]): r for r in rows if r["method"] == "vig-full"}
    t, kmax = graph["T"], max(r["clusters"] for r in rows)
    lines = [
        "### 1. Partitioned graph construction costs N²/κ instead of N² (one DEGC vs ViG's k-NN)",
        "",
        "| N | backend | padded κ: ViG time / DEGC time | masked κ: ViG / DEGC | padded peak memory / ViG's | "
        f"k-means share T·κ/N (κ = {kmax}) |",
        "|---:|---|---|---|---|---:|",
    ]
    holds_at = []
    for (n, bk), v in sorted(vig.items()):
        pads = sorted((r for r in rows if r["tokens"] == n and r["backend"] == bk and r["mode"] == "padded"),
                      key=lambda r: r["clusters"])
        masks = sorted((r for r in rows if r["tokens"] == n and r["backend"] == bk and r["mode"] == "masked"
                        and r["method"] != "vig-full"), key=lambda r: r["clusters"])
        sp = [(r["clusters"], v["median_s"] / r["median_s"]) for r in pads]
        sm = [(r["clusters"], v["median_s"] / r["median_s"]) for r in masks]
        mem = [(r["clusters"], r["peak_rss_growth_mib"] / v["peak_rss_growth_mib"]) for r in pads
               if r.get("peak_rss_growth_mib") and v.get("peak_rss_growth_mib")]
        if sp and all(s >= FASTER for _, s in sp):
            holds_at.append((n, bk))
        lines.append(
            f"| {n} | {bk} | " + ", ".join(f"κ={k}: {s:.2f}× ({verdict(s)})" for k, s in sp) + " | "
            + ", ".join(f"κ={k}: {s:.2f}×" for k, s in sm) + " | "
            + (", ".join(f"κ={k}: {m:.2f}" for k, m in mem) or "–") + f" | {t * kmax / n:.2f} |")
    ns = sorted({n for n, _ in vig})
    always = [n for n in ns if all((n, bk) in holds_at for bk in {b for _, b in vig})]
    best_pad = {n: max(v["median_s"] / r["median_s"] for r in rows for (n2, bk), v in vig.items()
                       if n2 == n and r["tokens"] == n and r["backend"] == bk and r["mode"] == "padded")
                for n in ns if any(r["tokens"] == n and r["mode"] == "padded" for r in rows)}
    widens = len(best_pad) > 1 and all(best_pad[a] < best_pad[b] for a, b in zip(ns, ns[1:]) if a in best_pad and b in best_pad)
    lines += [
        "",
        (f"**Holds from N = {always[0]} on** (both backends, every κ) in the padded layout"
         + (", and the gap widens with N (best padded speedup " + " → ".join(f"{best_pad[n]:.2f}×" for n in ns if n in best_pad)
            + "). " if widens else ". ")
         if always else "**Does not hold at any measured N on both backends.** ")
        + "It does not hold at small N: k-means (T = %d Lloyd iterations, T·κ·N·C MACs) costs T·κ/N of the "
          "full similarity (N²·C), i.e. %.2f at N = %d, and the partition gather/scatter adds memory traffic, so "
          "at ViG-Ti/S resolution (N = 196) graph construction is not cheaper. " % (t, t * kmax / ns[0], ns[0])
        + "The **masked** layout (the exported static graph, which TensorRT and ONNX Runtime take without dynamic "
          "shapes) still computes all N² similarities and adds the k-means, so its cost cannot fall as N²/κ; what "
          "it gains or loses above comes from how each backend's TopK handles masked rows. The N²/κ saving needs "
          "the padded layout or the partitioned k-NN plugin, which never forms an N×N matrix.",
    ]
    return lines


def model_claim(models: Dict) -> List[str]:
    rows = models["throughput"]
    ratios = ratio_table(rows, "median_s")
    if not ratios:
        return []
    best = max(ratios.items(), key=lambda kv: kv[1])
    worst = min(ratios.items(), key=lambda kv: kv[1])
    lines = [
        "### 2. Up to 5× lower end-to-end latency (ClusterViG vs ViG baseline, same blocks, N = 196)",
        "",
        f"Measured CViG/ViG throughput ratios range from {worst[1]:.2f}× ({worst[0][0]}, {worst[0][1]}, batch "
        f"{worst[0][2]}) to {best[1]:.2f}× ({best[0][0]}, {best[0][1]}, batch {best[0][2]}); "
        f"{sum(verdict(v) == 'faster' for v in ratios.values())} of {len(ratios)} cells are faster, "
        f"{sum(verdict(v) == 'on par' for v in ratios.values())} on par, "
        f"{sum(verdict(v) == 'slower' for v in ratios.values())} slower (table above). "
        + ("**The 5× does not reproduce against a like-for-like baseline at 224 px on this CPU**, for three reasons: the "
           if best[1] < 5 else "**A 5× gain is reached here.** Context: the ")
        + "paper's 5× compares different architectures (PViG, GreedyViG, ...) on an RTX 6000 Ada GPU, where the "
          "N×N k-NN of isotropic/pyramid ViGs is memory-bound and large batches expose it; on a CPU at N = 196 "
          "convolutions and FFNs take most of the time and the N² term is small (section 1 compares one graph "
          "construction at N = 196); and ClusterViG adds k-means and the GATv2 global update, which the baseline "
          "does not run.",
    ]
    return lines


def token_claim(models: Dict) -> List[str]:
    rows = models.get("tokens") or []
    if not rows:
        return []
    ratios = token_ratios(rows)
    ns = sorted({k[0] for k in ratios})
    lines = [
        "### 3. Partitioning makes higher resolutions affordable (whole model, batch 1)",
        "",
        "| N | backend | ViG / CViG-padded | ViG / CViG-masked | ViG / CViG-padded-exact (auto) |",
        "|---:|---|---:|---:|---:|",
    ]
    for n in ns:
        for bk in sorted({k[1] for k in ratios if k[0] == n}):
            pad = next((v for k, v in ratios.items() if k[:2] == (n, bk) and k[2].endswith("-padded")), None)
            msk = next((v for k, v in ratios.items() if k[:2] == (n, bk) and k[2].endswith("-masked")), None)
            exact = next((v for k, v in ratios.items() if k[:2] == (n, bk) and k[2].endswith("-padded-exact")), None)
            lines.append(f"| {n} | {bk} | {pad:.2f}× ({verdict(pad)}) | {msk:.2f}× ({verdict(msk)}) | "
                         + (f"{exact:.2f}× ({verdict(exact)})" if exact else "–") + " |")
    top = ns[-1]
    pads = [v for k, v in ratios.items() if k[0] == top and k[2].endswith("-padded")]
    lines += [
        "",
        f"At N = {top} the padded ClusterViG is {min(pads):.2f}–{max(pads):.2f}× faster than the ViG baseline end to "
        "end: " + ("**the scaling claim holds** — the N² k-NN grows to dominate ViG while ClusterViG's grows as N²/κ. "
                   if min(pads) >= FASTER else "**the scaling claim does not hold on this machine at these sizes.** ")
        + _masked_sentence([v for k, v in ratios.items() if k[0] == top and k[2].endswith("-masked")], top)
        + _exact_sentence([v for k, v in ratios.items() if k[0] == top and k[2].endswith("-padded-exact")], top),
    ]
    return lines


def _masked_sentence(masked: List[float], n: int) -> str:
    if not masked:
        return ""
    lo, hi = min(masked), max(masked)
    if hi <= SLOWER:
        how = f"is slower than the ViG baseline at N = {n} ({lo:.2f}–{hi:.2f}× its speed)"
    elif lo >= FASTER:
        how = f"gains less at N = {n} ({lo:.2f}–{hi:.2f}×)"
    else:
        how = f"is on par or mixed at N = {n} ({lo:.2f}–{hi:.2f}×)"
    return (f"The masked static form {how}: it still forms, masks and ranks all N² similarities, and adds "
            "k-means. ")


def _exact_sentence(exact: List[float], n: int) -> str:
    if not exact:
        return ""
    return (f"The padded layout with the exact capacity P = N — what `knn=\"auto\"` picks above N = 1024, exact for "
            f"any partition sizes — runs at {min(exact):.2f}–{max(exact):.2f}× ViG's speed at N = {n}: it forms κ·N² "
            "similarities. The speedup needs a capacity below N (`--knn padded --capacity P`, overflow rule in the "
            "README) or the k-NN plugin, which never forms a padded or N×N matrix.")


def batch_claim(models: Dict) -> List[str]:
    rows = [r for r in models["throughput"] if r["family"] == "cvig"]
    batches = sorted({r["batch"] for r in rows})
    if len(batches) < 2:
        return []
    lo, hi = batches[0], batches[-1]
    by = {(r["model"], r["backend"], r["batch"]): r["throughput_img_s"] for r in rows}
    gains = {(m, bk): by[(m, bk, hi)] / by[(m, bk, lo)] for (m, bk, b) in by if b == lo and (m, bk, hi) in by}
    up = [k for k, g in gains.items() if g >= FASTER]
    return [
        "### 4. Throughput rises with batch size (Table VI trend)",
        "",
        f"Throughput at batch {hi} vs batch {lo}: " + ", ".join(f"{m} {bk} {g:.2f}×" for (m, bk), g in gains.items())
        + f". It rises for {len(up)} of {len(gains)} (model, backend) pairs. On a 2-core CPU a batch of 1 already "
          "keeps the cores busy, so the GPU's large batch gains (Table VI: 36 → 4,939 img/s for CViG-Ti) cannot "
          "appear; the rise here comes from amortised per-call overhead (most visible in the Python-loop reference "
          "form and in ONNX Runtime).",
    ]


def markdown(models: Optional[Dict], graph: Optional[Dict]) -> str:
    lines = ["## The paper's efficiency claims on this machine", "",
             "`python -m bench.claims` — generated from the measurements above; verdict per cell: ViG time / "
             f"ClusterViG time ≥ {FASTER:.2f} is *faster*, ≤ {SLOWER:.2f} *slower*, else *on par*.", ""]
    if graph:
        lines += graph_claim(graph) + [""]
    if models and models.get("throughput"):
        lines += model_claim(models) + [""]
    if models:
        lines += token_claim(models) + [""]
    if models and models.get("throughput"):
        lines += batch_claim(models) + [""]
    lines += ["### 5. On a GPU", "", "See the GPU section: the claims were made on an NVIDIA RTX 6000 Ada; where no GPU "
              "was available to this run, none of the GPU-specific effects (memory-bound k-NN at large batch, kernel "
              "fusion in the plugins) is measured here."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = common.parser("python -m bench.claims", __doc__)
    ap.parse_args(argv)
    common.update_section("claims", markdown(common.read_json("models_cpu"), common.read_json("graph_construction_cpu")))
    print(f"wrote the 'claims' section of {common.BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
