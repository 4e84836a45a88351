"""The printed results table and the versions recorded with a run."""

from __future__ import annotations


def table(rows: list[dict]) -> str:
    """A plain-text results table."""
    cols = [("engine", "engine", "{}"), ("trace", "trace", "{}"), ("tok/s", "output_tok_per_s", "{:.0f}"),
            ("fin", "finished", "{}"), ("wall s", "wall_s", "{:.1f}"), ("peak seqs", "peak_running", "{}"),
            ("mean batch", "mean_decode_batch", "{}"), ("ms/step", "ms_per_step", "{:.2f}"),
            ("KV waste", "kv_waste", "{:.1%}"),
            ("KV used", "kv_use_of_budget", "{:.1%}"), ("hit", "prefix_hit_rate", "{:.1%}"),
            ("preempt", "preemptions", "{}"), ("TTFT p50/p99 s", None, ""), ("TPOT p50/p99 ms", None, ""),
            ("capped", "capped", "{}")]
    lines = []
    head = [c[0] for c in cols]
    body = []
    for r in rows:
        line = []
        for name, key, fmt in cols:
            if name.startswith("TTFT"):
                line.append(f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f}")
            elif name.startswith("TPOT"):
                line.append(f"{r['tpot_p50_ms']:.1f}/{r['tpot_p99_ms']:.1f}")
            else:
                line.append(fmt.format(r[key]))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for b in body:
        lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)))
    return "\n".join(lines)


def versions() -> dict:
    """torch, triton, pagegen and Python versions (bench.common.versions; imported late, after the smoke
    run has switched the Triton interpreter on)."""
    from bench.common import versions as _versions

    return _versions()
