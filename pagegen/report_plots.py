"""The images of `pagegen report` (matplotlib, Agg backend): each function writes one PNG and returns its path.

Imported only by pagegen.report after matplotlib was found (the `report` extra); pagegen's core never
imports it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pagegen.report_data import ReportData, SpecReport, StudyInfo  # noqa: E402

TUNED, HEUR, CEIL, OTHER = "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"


def _short(key: str) -> str:
    """decode_bf16_hd128_bs16_nhd_g4 -> bf16 hd128 bs16 nhd g4 (the family is the figure's title)."""
    return " ".join(key.split("_")[1:])


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend_on_top(ax: Any, title: str) -> None:
    """Title, and the legend in one row between the title and the bars (never over a bar)."""
    ax.set_title(title, pad=24)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, fontsize=8, frameon=False)


def _hbars(ax: Any, labels: list[str], series: list[tuple[str, str, list[float | None]]]) -> None:
    """Horizontal grouped bars, one row per label, one bar per series (None: no bar)."""
    n = len(series)
    h = 0.8 / n
    for i, (name, color, vals) in enumerate(series):
        ys = [r - 0.4 + h * (i + 0.5) for r in range(len(labels))]
        xs = [v if v is not None else 0.0 for v in vals]
        ax.barh(ys, xs, height=h, color=color, label=name)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row on top, no empty margin
    ax.grid(axis="x", alpha=0.3)


def roofline(data: ReportData, family: str, out: Path) -> Path | None:
    """Achieved rate of every (spec, bucket) of `family` against the card's ceiling: decode GB/s against
    the copy bandwidth, extend TFLOP/s against the matrix rate; tuned beside the heuristic."""
    specs = [s for s in data.specs if s.family == family]
    rows = [(s, r) for s in specs for r in s.rows if r.rate is not None]
    if not rows:
        return None
    compute = family == "extend"
    unit = "TFLOP/s" if compute else "GB/s"
    ceil = data.matmul_tflops if compute else data.copy_gbps
    labels = [f"{_short(s.key)} · {r.name}" + (" [stale]" if s.stale else "") for s, r in rows]
    series = [("tuned", TUNED, [r.rate for _, r in rows])]
    if any(r.heuristic_rate for _, r in rows):
        series.append(("heuristic (today's default config)", HEUR, [r.heuristic_rate for _, r in rows]))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.2 * len(rows) * len(series)))
    _hbars(ax, labels, series)
    ax.set_xlim(0, 1.1 * max([ceil or 0.0] + [r.rate for _, r in rows]))
    if ceil:
        what = "matrix rate" if compute else "copy bandwidth"
        ax.axvline(ceil, color=CEIL, ls="--", lw=1.5, label=f"measured {what}: {ceil:.0f} {unit}")
        for i, (_, r) in enumerate(rows):
            ax.text(r.rate, i, f" {100 * r.rate / ceil:.0f}%", va="center", fontsize=7)
    bound = "compute-bound: matrix FLOPs / latency" if compute else "memory-bound: KV bytes / latency"
    ax.set_xlabel(f"achieved {unit} ({bound})")
    _legend_on_top(ax, f"{data.table.gpu_name}: {family} kernels against the card's "
                   f"{'matrix rate' if compute else 'copy bandwidth'}" + ("" if ceil else " (ceiling not recorded)"))
    return _save(fig, out / f"roofline_{family}.png")


def gains(data: ReportData, out: Path) -> Path | None:
    """heuristic latency / tuned latency per (spec, bucket) where the study measured the heuristic."""
    rows = [(s, r) for s in data.specs for r in s.rows if r.gain]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.25 * len(rows)))
    labels = [f"{s.family} {_short(s.key)} · {r.name}" for s, r in rows]
    _hbars(ax, labels, [("tuned speed-up", TUNED, [r.gain for _, r in rows])])
    ax.axvline(1.0, color="k", lw=1)
    lo = min(0.95, min(r.gain for _, r in rows) - 0.02)
    ax.set_xlim(lo, max(r.gain for _, r in rows) * 1.05)
    for i, (_, r) in enumerate(rows):
        ax.text(r.gain, i, f" {r.gain:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("speed-up of the tuned config over the heuristic (heuristic us / tuned us; > 1: tuning helped)")
    ax.set_title(f"{data.table.gpu_name}: what tuning bought per bucket")
    return _save(fig, out / "gain.png")


def held_out(data: ReportData, out: Path) -> Path | None:
    """table / heuristic latency per held-out shape of every spec (1.0: as fast; above: slower)."""
    rows = [(s, h) for s in data.specs for h in (s.held_out or [])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 2.0 + 0.25 * len(rows)))
    labels = [f"{s.family} {_short(s.key)} · {h.name}" for s, h in rows]
    colors = [CEIL if h.ratio > 1.03 else TUNED for _, h in rows]
    ax.barh(range(len(rows)), [h.ratio for _, h in rows], color=colors)
    for i, (_, h) in enumerate(rows):
        ax.text(h.ratio, i, f" {h.ratio:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=1, label="as fast as the heuristic")
    ax.axvline(1.03, color=CEIL, ls="--", lw=1, label="3% slower (the tuner adds a bucket)")
    ax.set_xlim(min(0.9, min(h.ratio for _, h in rows) - 0.02), max(1.1, max(h.ratio for _, h in rows) + 0.02))
    ax.set_xlabel("table latency / heuristic latency on shapes between the buckets (< 1: the table is faster)")
    _legend_on_top(ax, f"{data.table.gpu_name}: held-out check")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out / "held_out.png")


def study_plots(spec: SpecReport, index: int, out: Path) -> list[tuple[str, str, Path]]:
    """Optuna's optimisation history and parameter importances of each study of `spec`:
    [(study name, "history" | "importance", PNG path)]."""
    made = []
    with matplotlib.rc_context():  # Optuna's plots switch the global style to ggplot: keep that in here
        for j, info in enumerate(spec.studies):
            made += _study_images(spec, info, out / f"study{index:02d}_{j}")
    return made


def _study_images(spec: SpecReport, info: StudyInfo, stem: Path) -> list[tuple[str, str, Path]]:
    """The two Optuna images of one study, as `<stem>_history.png` and `<stem>_importance.png`."""
    import optuna.visualization.matplotlib as ovm

    made = []
    done = [t for t in info.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    tag = info.name.split(":")[-1]  # the bucket-set part of the study name tells a spec's studies apart
    for what, fn in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances)):
        if not done or (what == "importance" and len(done) < 2):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notices
            try:
                ax = fn(info.study)
            except Exception:  # noqa: BLE001 - e.g. importances of one-valued params: skip that image
                plt.close("all")
                continue
        fig = ax.figure
        fig.set_size_inches(9, 4.2)
        for loc in ("left", "center", "right"):  # Optuna's own title would overlap ours
            ax.set_title("", loc=loc)
        if what == "history":
            ax.set_yscale("log")
            ax.set_ylabel("weighted geo-mean latency (us)")
            ax.set_xlabel("trial number")
            ax.set_title(f"{spec.key}: optimisation history ({tag})", fontsize=10)
        else:
            ax.set_xlabel("importance for the objective (fANOVA)")
            ax.set_title(f"{spec.key}: parameter importances ({tag})", fontsize=10)
        made.append((info.name, what, _save(fig, Path(f"{stem}_{what}.png"))))
    return made


def compare(a: ReportData, b: ReportData, out: Path) -> Path | None:
    """Rate of each shared (spec, bucket) in table a and table b, side by side."""
    rows = []
    for sa in a.specs:
        sb = next((s for s in b.specs if s.key == sa.key), None)
        if sb is None:
            continue
        for ra in sa.rows:
            rb = next((r for r in sb.rows if r.name == ra.name), None)
            if rb is not None and ra.rate is not None and rb.rate is not None:
                rows.append((sa, ra, rb))
    if not rows:
        return None
    units = sorted({s.unit for s, _, _ in rows})
    fig, axes = plt.subplots(1, len(units), figsize=(10 * len(units), 1.2 + 0.5 * len(rows)), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        mine = [(s, ra, rb) for s, ra, rb in rows if s.unit == unit]
        labels = [f"{s.family} {_short(s.key)} · {ra.name}" for s, ra, _ in mine]
        _hbars(ax, labels, [(f"{a.table.gpu_key} ({a.path.name})", TUNED, [ra.rate for _, ra, _ in mine]),
                            (f"{b.table.gpu_key} ({b.path.name})", OTHER, [rb.rate for _, _, rb in mine])])
        ax.set_xlabel(f"achieved {unit}")
        _legend_on_top(ax, f"{a.table.gpu_name} vs {b.table.gpu_name}: shared specs and buckets")
    return _save(fig, out / "compare.png")
