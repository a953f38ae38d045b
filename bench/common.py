"""Shared benchmark plumbing: machine description, timing, results files, BENCHMARKS.md sections."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from clustervig.utils import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
# `python -m bench --quick` writes its smoke numbers here (ignored by git), never over the published results
QUICK_RESULTS = ROOT / "bench" / "results" / "tmp-quick"


def configure(results_dir: Optional[Path] = None, markdown_path: Optional[Path] = None) -> None:
    """Send results and BENCHMARKS.md elsewhere (tests, quick runs); None keeps the repository paths."""
    global RESULTS, BENCHMARKS_MD
    RESULTS = Path(results_dir) if results_dir is not None else ROOT / "bench" / "results"
    BENCHMARKS_MD = Path(markdown_path) if markdown_path is not None else ROOT / "BENCHMARKS.md"


def quick_paths(results_dir: Optional[Path], markdown_path: Optional[Path]) -> "tuple[Path, Path]":
    """Where a quick (smoke) run writes: ``results_dir`` (default :data:`QUICK_RESULTS`) and ``markdown_path``
    (default ``BENCHMARKS.md`` inside that folder). The published ``bench/results/`` and ``BENCHMARKS.md`` are
    refused: smoke numbers must not replace measured ones."""
    published_dir, published_md = (ROOT / "bench" / "results").resolve(), (ROOT / "BENCHMARKS.md").resolve()
    results = Path(results_dir) if results_dir is not None else QUICK_RESULTS
    markdown = Path(markdown_path) if markdown_path is not None else results / "BENCHMARKS.md"
    if results.resolve() == published_dir:
        raise ValueError(f"--results {results}: a quick run does not write its smoke numbers over the published "
                         f"results; leave --results out (they go to {QUICK_RESULTS}) or name another folder")
    if markdown.resolve() == published_md:
        raise ValueError(f"--markdown {markdown}: a quick run does not rewrite the published BENCHMARKS.md; leave "
                         f"--markdown out (it goes to {results / 'BENCHMARKS.md'}) or name another file")
    return results, markdown


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None


def publish(json_name: str, section: str, res: Dict, markdown: Callable[[Dict], str]) -> Path:
    """Write bench/results/<json_name>.json and the section of BENCHMARKS.md; print where."""
    path = write_json(json_name, res)
    update_section(section, markdown(res))
    print(f"wrote {path} and the '{section}' section of {BENCHMARKS_MD}")
    return path


def ms(s: Dict) -> str:
    """A summary as 'median (min–max)' in milliseconds."""
    return f"{s['median_s'] * 1e3:.1f} ({s['min_s'] * 1e3:.1f}–{s['max_s'] * 1e3:.1f})"


def machine() -> Dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def status_kib(field: str) -> Optional[int]:
    """A memory field of ``/proc/self/status`` (VmRSS, VmHWM: this process's own address space) in KiB, or None
    where there is no such file. ru_maxrss is no substitute: Linux carries the parent's high-water mark into a
    forked-and-exec'd child."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Run every function ``repeats`` times, interleaved (A B A B ...), so that
    machine noise hits all of them alike. Returns seconds per call per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(samples: List[float]) -> Dict[str, float]:
    s = sorted(samples)
    return {
        "median_s": statistics.median(s),
        "min_s": s[0],
        "max_s": s[-1],
        "iqr_s": (s[(3 * len(s)) // 4] - s[len(s) // 4]) if len(s) >= 4 else s[-1] - s[0],
        "n": len(s),
    }


def write_json(name: str, payload: Dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, payload)
    return path


def read_json(name: str) -> Optional[Dict]:
    """bench/results/<name>.json, or None when that step has not run."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def update_section(key: str, markdown: str, path: Optional[Path] = None) -> None:
    """Replace (or append) the block between ``<!-- bench:KEY -->`` markers in BENCHMARKS.md (or ``path``)."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    target = BENCHMARKS_MD if path is None else Path(path)
    text = target.read_text() if target.exists() else "# Benchmarks\n\nGenerated by the commands named in each section; raw results in `bench/results/`.\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    target.write_text(text)


def cuda_graphed(model, x) -> Callable[[], object]:
    """Capture one forward at this shape into a CUDA graph (after warm-up on a side stream); returns replay."""
    import torch

    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_y = model(static_x)

    def replay():
        graph.replay()
        return static_y

    replay.graph = graph  # keeps the graph (and its memory pool) alive with the callable
    return replay
