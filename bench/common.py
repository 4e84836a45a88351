"""What every benchmark script shares: timing, the two hardware ceilings, GPU naming, run metadata
and where results go.

    timeit(fn, n_inputs=1, graph=True)   -> Timing      pagegen.timing.bench (the tuner's timer), graph
                                                         capture falling back to CUDA events
    copy_gbps()                          -> GB/s | None device-to-device copy (pagegen.timing.copy_bandwidth)
    matmul_tflops()                      -> TFLOP/s | None  bf16 8192^3 matmul on random data, median
    device_info()                        -> GpuInfo | None  pagegen.gpu.detect(): the key names the card
    run_meta(name, ...)                  -> dict        card, key, SM count, versions, date, both ceilings
    result_path(name, key, ...)          -> Path        bench/results/<name>-<key>-<date>[-<tag>].json
    tee_log(json_path)                                  context: stdout/stderr also go to the .log beside it

Results land in bench/results/ unless $PAGEGEN_BENCH_RESULTS names another folder (the GPU sitting
script points it at $OUT) or a script's --out names the JSON file itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pagegen import gpu as _gpu  # noqa: E402
from pagegen import timing as _timing  # noqa: E402

if TYPE_CHECKING:
    from pagegen.gpu import GpuInfo
    from pagegen.timing import Timing

ENV_RESULTS = "PAGEGEN_BENCH_RESULTS"
MATMUL_N = 8192  # the matrix rate is measured on an N x N x N bf16 product


def results_dir() -> Path:
    """$PAGEGEN_BENCH_RESULTS if set, else bench/results/ of this checkout."""
    env = os.environ.get(ENV_RESULTS)
    return Path(env) if env else ROOT / "bench" / "results"


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1): times are meaningless there."""
    info = _gpu.detect()
    return info is not None and info.interpret


def device_info() -> GpuInfo | None:
    """The live device (pagegen.gpu.detect): the interpreter, the CUDA GPU, or None."""
    return _gpu.detect()


def device_key() -> str:
    """The card's key for file names (pagegen.gpu.gpu_key: "h200", "rtx4090", ...); "cpu" without a GPU."""
    info = device_info()
    return info.key if info is not None else "cpu"


def today() -> str:
    """UTC date, YYYY-MM-DD (the date in result file names)."""
    return dt.datetime.now(dt.UTC).date().isoformat()


def result_path(name: str, key: str | None = None, *, date: str | None = None, tag: str = "",
                out: str | os.PathLike | None = None) -> Path:
    """JSON path of a run: <folder>/<name>-<key>-<date>[-<tag>].json, the folder being `out` if it is an
    existing folder, else results_dir(); `out` naming anything else is the JSON path itself.

    name: the benchmark ("decode", "extend", "kv_ops", ...); key: the card (default: the live one).
    """
    stem = f"{name}-{key or device_key()}-{date or today()}" + (f"-{tag}" if tag else "")
    if out and not Path(out).is_dir():
        return Path(out)
    return (Path(out) if out else results_dir()) / f"{stem}.json"


def write_json(path: Path, obj: Any) -> Path:
    """Write obj as indented JSON through a temporary file (no half-written results); returns path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


class _Tee:
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, ...: the terminal stream's (fd writes skip the log)
        return getattr(self.streams[0], name)


@contextlib.contextmanager
def tee_log(json_path: Path) -> Iterator[Path]:
    """Copy everything printed to stdout and stderr into <json_path without .json>.log; yields that path."""
    log = json_path.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    old_out, old_err = sys.stdout, sys.stderr
    with open(log, "w", buffering=1) as fh:
        sys.stdout, sys.stderr = _Tee(old_out, fh), _Tee(old_err, fh)
        try:
            yield log
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def timeit(fn: Callable[[int], object], *, n_inputs: int = 1, graph: bool = True, flush: bool = True,
           warmup: int = 5, reps: int = 50) -> Timing:
    """Median time of fn(i) with pagegen.timing.bench: CUDA-graph replay of fn(i % n_inputs), the L2
    flushed before each run (GPU time from HBM, no host launch cost). If fn cannot be captured in a
    graph (a host sync, a lazy compile), CUDA events around each call instead (host cost included
    when the host is the slower side); Timing.method says which. Host clock under the interpreter."""
    if graph:
        try:
            return _timing.bench(fn, n_inputs=n_inputs, warmup=warmup, reps=reps, flush=flush, graph=True)
        except Exception:  # capture failed (a host sync, a lazy compile): time the eager calls instead
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    return _timing.bench(fn, n_inputs=n_inputs, warmup=warmup, reps=reps, flush=flush, graph=False)


def copy_gbps() -> float | None:
    """Device-to-device copy bandwidth, GB/s (bytes read + written): the memory ceiling. None on the CPU."""
    if interpreting():
        return None
    return _timing.copy_bandwidth()


def matmul_tflops(n: int = MATMUL_N, runs: int = 5) -> float | None:
    """bf16 n x n x n matmul rate in TFLOP/s on random data (not zeros: those run faster), the median of
    `runs` medians of 10 timed products each: the compute ceiling. None on the CPU."""
    if interpreting() or not torch.cuda.is_available():
        return None

    def medians() -> list[float]:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
        return [_timing.bench(lambda i: torch.mm(a, b, out=c), warmup=3, reps=10, flush=False).median_us
                for _ in range(runs)]

    meds = medians()
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(meds) / 1e6


def versions() -> dict[str, str]:
    """torch, triton, pagegen and Python versions."""
    import triton

    import pagegen

    return {"torch": torch.__version__, "triton": triton.__version__, "pagegen": pagegen.__version__,
            "python": platform.python_version()}


def run_meta(name: str, *, workload: str = "", copy: bool = True, matmul: bool = False) -> dict[str, Any]:
    """Metadata every result file starts with: the card (name, key, SM count, capability), versions,
    the UTC time, and the ceilings measured in this same run (copy GB/s; matmul TFLOP/s when asked)."""
    info = device_info()
    meta: dict[str, Any] = {
        "bench": name,
        "gpu": info.name if info else "cpu",
        "gpu_key": info.key if info else "cpu",
        "sm_count": info.sm_count if info else 0,
        "capability": info.capability if info else "",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **versions(),
        "workload": workload,
        "copy_gbps": copy_gbps() if copy else None,
        "matmul_tflops": matmul_tflops() if matmul else None,
        "argv": sys.argv[1:],
    }
    return meta


def meta_line(meta: dict[str, Any]) -> str:
    """One line naming the card, versions and ceilings of a run."""
    parts = [f"{meta['gpu']} ({meta['gpu_key']}, {meta['sm_count']} SMs)", meta["date"],
             f"torch {meta['torch']}", f"triton {meta['triton']}", f"pagegen {meta['pagegen']}"]
    if meta.get("copy_gbps"):
        parts.append(f"copy {meta['copy_gbps']:.0f} GB/s")
    if meta.get("matmul_tflops"):
        parts.append(f"bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s")
    return "  ".join(parts)
