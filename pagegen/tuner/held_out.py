"""Held-out shapes: does the table's pick beat the heuristic between the tuned buckets?

    held_out_buckets(workload, interpret)                 -> shapes between its buckets
    check_held_out(table, workloads, gpu, options)        -> [HeldOutRow]; fixes `table` in place

For each entry of a freshly tuned table, shapes that lie between its buckets (geometric midpoints
of neighbouring buckets; uniform and, for decode, ragged lengths; several batch sizes and lengths)
are timed with the config the table picks (the nearest bucket's winner) and with the heuristic's
(`dispatch.heuristic_config`). Each comparison is recorded on the entry (`Entry.held_out`). Where
the table's pick is more than `tolerance` slower than the heuristic on a shape near one of its
buckets, the shape becomes a bucket of its own: the fastest of the entry's winners and the
heuristic's config, timed on that shape. A table so fixed is never slower than no table on the
shapes checked.

With a sliding window the shapes keep their full context in the inputs, but every comparison is
made as the dispatcher makes it, on the effective context min(window, ctx) (Workload.table_shape):
the table's nearest bucket, the heuristic's config, the distance, and the records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pagegen.dispatch import NEAR_LOG2
from pagegen.gpu import INTERPRET_KEY, GpuInfo
from pagegen.spec import Config, illegal_reason
from pagegen.table import BucketResult, HeldOut, Table
from pagegen.tuner.runners import rate, runner_for
from pagegen.tuner.study import TuneOptions
from pagegen.tuner.trial import time_config
from pagegen.workloads import Bucket, Workload

TOLERANCE = 0.03  # the table's pick may be this much slower than the heuristic before a bucket is added
MAX_SHAPES = 12  # held-out shapes per entry on a GPU
MAX_SHAPES_INTERPRET = 2  # ... under the interpreter (tiny, and the timings mean nothing)


@dataclass(frozen=True, slots=True)
class HeldOutRow:
    """One held-out comparison: the table's pick against the heuristic on one shape."""

    spec_key: str
    bucket: Bucket  # the held-out shape
    near: str  # name of the entry's nearest bucket
    table_config: Config
    heuristic_config: Config
    table_us: float
    heuristic_us: float
    added: str | None  # the new bucket's name when this shape became one

    @property
    def ratio(self) -> float:
        """table / heuristic latency (> 1: the table is slower)."""
        return self.table_us / self.heuristic_us if self.heuristic_us > 0 else 1.0


def _dist(a: tuple[int, int], b: tuple[int, int]) -> float:
    return math.hypot(math.log2(a[0] / b[0]), math.log2(a[1] / b[1]))


def held_out_buckets(workload: Workload, interpret: bool = False) -> list[Bucket]:
    """Shapes between the workload's buckets: the geometric midpoint of each bucket and its nearest
    neighbour in (log2 a, log2 ctx) space (a lone bucket: 1.5x it), never one of the buckets. Every
    midpoint comes once (decode: uniform and ragged lengths alternating) before the other kind of
    any; at most MAX_SHAPES (MAX_SHAPES_INTERPRET under the interpreter). With a window, a shape
    whose effective shape (Workload.table_shape) is a bucket's, or an earlier shape's, is left out."""
    shapes = sorted({b.shape for b in workload.buckets})
    mids: list[tuple[int, int]] = []
    for s in shapes:
        others = [o for o in shapes if o != s]
        if not others:
            mids.append((max(1, round(s[0] * 1.5)), max(1, round(s[1] * 1.5))))
            continue
        o = min(others, key=lambda o: (_dist(s, o), o))
        mids.append((max(1, round(math.sqrt(s[0] * o[0]))), max(1, round(math.sqrt(s[1] * o[1])))))
    decode = workload.spec.family == "decode"
    seen = {(workload.table_shape(b), b.ragged) for b in workload.buckets}
    mids = list(dict.fromkeys(mids))
    # first every midpoint once (uniform and ragged alternating), then the other kind of each
    order = [(m, decode and i % 2 == 1) for i, m in enumerate(mids)]
    if decode:
        order += [(m, i % 2 == 0) for i, m in enumerate(mids)]
    out: list[Bucket] = []
    for m, ragged in order:
        b = Bucket(m[0], m[1], ragged=ragged)
        if (workload.table_shape(b), ragged) not in seen:
            seen.add((workload.table_shape(b), ragged))
            out.append(b)
    return out[:MAX_SHAPES_INTERPRET if interpret else MAX_SHAPES]


def _nearest(entry, shape: tuple[int, int], ragged: bool) -> BucketResult | None:
    """The entry's bucket the table picks for a call of `shape` (effective context; the dispatcher's
    nearest-bucket rule)."""
    from pagegen.dispatch import nearest_bucket

    return nearest_bucket(entry, shape[0], shape[1], entry.kv_heads, ragged)


def check_held_out(table: Table, workloads: Sequence[Workload], gpu: GpuInfo, options: TuneOptions,
                   tolerance: float = TOLERANCE, say: Callable[[str], None] | None = None) -> list[HeldOutRow]:
    """Time the held-out shapes of every tuned workload with the table's pick and the heuristic's;
    record them on the entries and add a bucket where the table's pick loses by more than
    `tolerance` near its bucket (see the module docstring). Returns the comparisons."""
    from pagegen.dispatch import heuristic_config

    interp = gpu.key == INTERPRET_KEY
    say = say or (lambda s: None)
    rows: list[HeldOutRow] = []
    for w in workloads:
        entry = table.entries.get(w.spec.variant_key())
        if entry is None:
            continue
        runner = runner_for(w, "cpu" if interp else "cuda", interp, options.runners)
        as_tuned = replace(entry, buckets=list(entry.buckets))  # every shape is judged against the tuned table
        held: list[HeldOut] = []
        for b in held_out_buckets(w, interp):
            if not (interp or runner.fits(b)):
                continue
            shape = w.table_shape(b)  # what the dispatcher looks up: (a, min(window, ctx))
            near = _nearest(as_tuned, shape, b.ragged)
            if near is None:  # no bucket of this kind: the dispatcher uses the heuristic, nothing to judge
                continue
            pick = near.config
            heur = heuristic_config(w.spec, *shape, w.kv_heads, gpu.sm_count, b.ragged)
            times = {pick: time_config(runner, pick, b, options.timing)}
            if heur not in times:
                times[heur] = time_config(runner, heur, b, options.timing)
            t_us, h_us = times[pick], times[heur]
            added = None
            if t_us > (1 + tolerance) * h_us and _dist(shape, near.shape) <= NEAR_LOG2:
                for c in dict.fromkeys(r.config for r in as_tuned.buckets):
                    if c not in times and illegal_reason(w.spec, c) is None:
                        times[c] = time_config(runner, c, b, options.timing)
                best = min(times, key=lambda c: (times[c], c != heur))
                gbps, tflops = rate(runner, b, times[best])
                entry.buckets.append(BucketResult(shape=shape, config=best, latency_us=times[best], gbps=gbps,
                                                  tflops=tflops, trials=len(times), ragged=b.ragged))
                added = entry.buckets[-1].name
            held.append(HeldOut(shape=shape, ragged=b.ragged, table_us=t_us, heuristic_us=h_us))
            rows.append(HeldOutRow(entry.key, b, near.name, pick, heur, t_us, h_us, added))
            say(f"[{entry.key}] held-out {b.name}: table ({near.name}) {t_us:.1f} us, heuristic {h_us:.1f} us"
                + (f" -> added bucket {added}" if added else ""))
        entry.held_out = held
    return rows


def format_held_out(rows: Sequence[HeldOutRow], interpret: bool) -> str:
    """The end-of-run comparison: per held-out shape the table's pick against the heuristic."""
    if not rows:
        return "held-out shapes: none checked"
    hdr = f"{'held-out shape':<40} {'near':>10} {'table us':>10} {'heur us':>10} {'table/heur':>10}  note"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        note = f"added bucket {r.added}" if r.added else ("same config" if r.table_config == r.heuristic_config else "")
        lines.append(f"{r.spec_key + ' ' + r.bucket.name:<40} {r.near:>10} {r.table_us:>10.1f} "
                     f"{r.heuristic_us:>10.1f} {r.ratio:>10.3f}  {note}")
    if interpret:
        lines.append("(interpreter run: the held-out timings mean nothing; the flow is what is exercised)")
    return "\n".join(lines)
