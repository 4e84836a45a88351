"""`pagegen report`: one self-contained HTML page (PNGs embedded as data URIs) plus the PNGs, from a tuned
table and its Optuna study storage.

    write_report(data, out_dir) -> Path            # out_dir/report.html and out_dir/*.png
    write_compare(a, b, out_dir) -> Path           # out_dir/compare.html and out_dir/compare.png

The data comes from pagegen.report_data (no plotting there); the images from pagegen.report_plots
(matplotlib, Agg), imported only here and only after `require_matplotlib()`.
"""

from __future__ import annotations

import base64
import html
import importlib.util
from pathlib import Path

from pagegen.report_data import BucketRow, ReportData, ReportError, SpecReport

INSTALL_HINT = 'pip install "pagegen[report]"'


def require_matplotlib() -> None:
    """Raise ReportError (what to install) when matplotlib, which the images need, is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("matplotlib is not installed", INSTALL_HINT)


def _e(x: object) -> str:
    return html.escape(str(x))


def _img(path: Path | None, alt: str) -> str:
    """The PNG embedded as a data URI, linked to the file beside the page."""
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><a href="{_e(path.name)}"><img alt="{_e(alt)}" title="{_e(path.name)}" '
            f'src="data:image/png;base64,{data}"></a><figcaption>{_e(path.name)}</figcaption></figure>')


def _table(head: list[str], rows: list[list[object]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _f(x: float | None, fmt: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _cfg(c, family: str) -> str:
    """A config in one short cell: block_n, warps, stages, then block_m (extend) or split_size (decode)."""
    s = f"n{c.block_n} w{c.num_warps} s{c.num_stages}"
    return s + (f" m{c.block_m}" if family == "extend" else f" split{c.split_size}")


def _ceiling(data: ReportData, spec: SpecReport) -> float | None:
    return data.matmul_tflops if spec.family == "extend" else data.copy_gbps


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
figure{margin:1em 0}figcaption{font-size:11px;color:#777}.warn{color:#b00}.note{color:#555;font-size:14px}"""


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style>"
            f"</head><body>\n<h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def _provenance(data: ReportData) -> list[str]:
    t = data.table
    flags = []
    if t.interpret:
        flags.append("interpreter run: the timings come from the Triton CPU interpreter and mean nothing")
    if t.forced:
        flags.append("tuned with --force-gpu on a device of another key")
    rows = [["table", str(data.path)], ["card", f"{t.gpu_name} (key {t.gpu_key}, {t.sm_count} SMs, sm {t.capability})"],
            ["toolchain", ", ".join(f"{k} {v}" for k, v in t.toolchain.items())], ["tuned at", t.tuned_at],
            ["copy bandwidth", f"{data.copy_gbps:.0f} GB/s ({data.ceiling_source['copy']})" if data.copy_gbps
             else "not recorded in the table (give --copy-gbps): no ceiling drawn"],
            ["matrix rate", f"{data.matmul_tflops:.0f} TFLOP/s ({data.ceiling_source['matmul']})" if data.matmul_tflops
             else "not recorded in the table (give --matmul-tflops): no ceiling drawn"],
            ["study storage", data.storage_note]]
    out = ["<h2>Provenance</h2>", _table(["what", "value"], rows)]
    out += [f"<p class='warn'>{_e(f)}</p>" for f in flags]
    stale = [s for s in data.specs if s.stale]
    out.append("<h3>Stale entries</h3>")
    if stale:
        out.append("<p class='warn'>The kernel these entries were tuned on has changed since: the dispatcher ignores "
                   "them and uses the heuristic. Re-tune them.</p>")
        out.append(_table(["spec", "tuned on hash", "current hash", "tuned at"],
                          [[s.key, s.entry.tuned_on, s.current_hash, s.entry.tuned_at] for s in stale]))
    else:
        out.append("<p>None: every entry's kernel hash matches the installed templates.</p>")
    hashes = sorted({(s.family, s.entry.tuned_on, s.entry.tuned_at[:10]) for s in data.specs})
    out.append(_table(["family", "template hash", "tuned on"], [list(h) for h in hashes]))
    return out


def _bucket_rows(data: ReportData, spec: SpecReport) -> list[list[object]]:
    ceil = _ceiling(data, spec)
    out = []
    for r in spec.rows:
        r: BucketRow
        pct = _f(100 * r.rate / ceil, ".0f") + "%" if (ceil and r.rate is not None) else "-"
        out.append([r.name, _cfg(r.config, spec.family), _f(r.tuned_us), _f(r.rate), pct,
                    _cfg(r.heuristic, spec.family) if r.heuristic else "-", _f(r.heuristic_us), _f(r.heuristic_rate),
                    _f(r.gain, ".2f") + "x" if r.gain else "-"])
    return out


def _spec_section(data: ReportData, spec: SpecReport, images: dict[str, list[tuple[str, Path]]]) -> list[str]:
    e = spec.entry
    models = f" ({', '.join(e.models)})" if e.models else ""
    out = [f"<h3 id='{_e(spec.key)}'>{_e(spec.key)}{_e(models)}</h3>",
           f"<p class='note'>kv_heads {e.kv_heads}; {e.trials} trials in the table ({e.failed} failed); tuned "
           f"{_e(e.tuned_at)}; kernel {_e(e.tuned_on)}{' — STALE' if spec.stale else ''}</p>"]
    shape = "q_tok x ctx" if spec.family == "extend" else "batch x ctx"
    out.append("<p class='note'>config: n block_n, w num_warps, s num_stages, then "
               + ("m block_m" if spec.family == "extend" else "split split_size (0: no split-KV)") + "</p>")
    out.append(_table([shape, "tuned config", "tuned us", spec.unit, "% of ceiling", "heuristic config",
                       "heuristic us", f"heuristic {spec.unit}", "gain"], _bucket_rows(data, spec)))
    if not any(r.heuristic_us for r in spec.rows):
        out.append("<p class='note'>No heuristic timing is recorded for this spec (no study trial ran today's "
                   "heuristic config): tuned results only.</p>")
    if spec.held_out is None:
        out.append("<p class='note'>Held-out check: not recorded in this table.</p>")
    elif spec.held_out:
        worst = max(h.ratio for h in spec.held_out)
        verdict = ("no held-out shape slower than the heuristic" if worst <= 1.0 else
                   f"slowest held-out shape: {worst:.3f}x the heuristic's latency")
        out.append(f"<p>Held-out check: {_e(verdict)}.</p>")
        out.append(_table(["shape", "ragged", "table us", "heuristic us", "table / heuristic"],
                          [[h.name, "yes" if h.ragged else "no", _f(h.table_us), _f(h.heuristic_us),
                            _f(h.ratio, ".3f")] for h in spec.held_out]))
    for info in spec.studies:
        states = ", ".join(f"{k.lower()} {v}" for k, v in sorted(info.states.items()))
        out.append(f"<h4>study {_e(info.name)}</h4><p>trials: {_e(states)}; GPU time of finished trials: "
                   f"{info.gpu_minutes:.1f} min</p>")
        if info.failures:
            out.append(_table(["failed: reason", "trials", "example"],
                              [[k, v, info.failure_examples.get(k, "")[:160]] for k, v in info.failures.items()]))
        else:
            out.append("<p class='note'>No failed trials.</p>")
        if info.pruned:
            out.append("<p class='note'>pruned before running: "
                       + _e(", ".join(f"{k} {v}" for k, v in info.pruned.items())) + "</p>")
        for what, path in images.get(info.name, []):
            out.append(_img(path, f"{info.name} {what}"))
    return out


def write_report(data: ReportData, out_dir: str | Path) -> Path:
    """Draw every image of `data` into `out_dir` and write `out_dir/report.html` (images embedded);
    returns the HTML path."""
    require_matplotlib()
    from pagegen import report_plots as P

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = data.table
    body = _provenance(data)
    body.append("<h2>Rooflines</h2>")
    if not data.heuristic_recorded:
        body.append("<p class='note'>No heuristic timing is recorded (no study, or no trial of today's heuristic "
                    "configs): the charts show the tuned results only.</p>")
    for fam in sorted({s.family for s in data.specs}):
        body.append(_img(P.roofline(data, fam, out), f"{fam} roofline"))
    body.append("<h2>Tuned against the heuristic</h2>")
    body.append(_img(P.gains(data, out), "gain per bucket") or "<p>No heuristic timing recorded.</p>")
    body.append(_img(P.held_out(data, out), "held-out check") or "<p>No held-out check recorded.</p>")
    images: dict[str, list[tuple[str, Path]]] = {}
    for i, spec in enumerate(data.specs):
        for name, what, path in P.study_plots(spec, i, out):
            images.setdefault(name, []).append((what, path))
    minutes = sum(i.gpu_minutes for s in data.specs for i in s.studies)
    trials = sum(i.finished for s in data.specs for i in s.studies)
    body.append(f"<h2>Per spec</h2><p>{len(data.specs)} specs; studies: {trials} finished trials, "
                f"{minutes:.1f} GPU-minutes.</p>")
    for spec in data.specs:
        body += _spec_section(data, spec, images)
    page = out / "report.html"
    page.write_text(_page(f"pagegen report: {t.gpu_name} ({t.gpu_key})", body))
    return page


def write_compare(a: ReportData, b: ReportData, out_dir: str | Path) -> Path:
    """Two tables side by side (two cards or two toolchains): per shared spec and bucket the latency and
    rate of each; writes `out_dir/compare.html` (+ compare.png) and returns the HTML path."""
    require_matplotlib()
    from pagegen import report_plots as P

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = []
    for d in (a, b):
        t = d.table
        body.append(f"<p><b>{_e(d.path)}</b>: {_e(t.gpu_name)} ({_e(t.gpu_key)}), "
                    f"{_e(', '.join(f'{k} {v}' for k, v in t.toolchain.items()))}, tuned {_e(t.tuned_at)}</p>")
    rows = []
    for sa in a.specs:
        sb = next((s for s in b.specs if s.key == sa.key), None)
        for ra in sa.rows if sb else []:
            rb = next((r for r in sb.rows if r.name == ra.name), None)
            if rb is not None:
                rows.append([sa.key, ra.name, _f(ra.tuned_us), _f(rb.tuned_us), _f(ra.rate), _f(rb.rate),
                             sa.unit, _f(ra.tuned_us / rb.tuned_us, ".2f") + "x"])
    if not rows:
        raise ReportError(f"{a.path} and {b.path} share no (spec, bucket)",
                          "compare tables tuned on the same specs and buckets")
    body.append(_img(P.compare(a, b, out), "comparison"))
    body.append(_table(["spec", "bucket", f"{a.table.gpu_key} us", f"{b.table.gpu_key} us", f"{a.table.gpu_key} rate",
                        f"{b.table.gpu_key} rate", "unit", f"{b.table.gpu_key} speed-up"], rows))
    only = sorted(set(s.key for s in a.specs) ^ set(s.key for s in b.specs))
    if only:
        body.append(f"<p class='note'>Specs in one table only: {_e(', '.join(only))}</p>")
    page = out / "compare.html"
    page.write_text(_page(f"pagegen compare: {a.table.gpu_name} vs {b.table.gpu_name}", body))
    return page
