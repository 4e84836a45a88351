"""`pagegen report`: argument parsing only; the data is read by pagegen.report_data, drawn and written by
pagegen.report (images need the `report` extra: matplotlib)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pagegen.cli_errors import UsageError


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of one table (--gpu/--table) or the comparison of two (--compare A B)."""
    from pagegen import report as R
    from pagegen.report_data import ReportError, default_storage, gather

    try:
        R.require_matplotlib()
        ceil = {"copy_gbps": args.copy_gbps, "matmul_tflops": args.matmul_tflops}
        if args.compare:
            if args.gpu or args.table or args.storage:
                raise ReportError("--compare takes two table files and no --gpu/--table/--storage",
                                  "run `pagegen report --compare A.yaml B.yaml`")
            a, b = (gather(p, None, **ceil) for p in args.compare)
            page = R.write_compare(a, b, args.out or "report-compare")
        else:
            if not args.gpu and not args.table:
                raise ReportError("give --gpu KEY (its shipped table) or --table PATH",
                                  "e.g. `pagegen report --gpu h100`")
            from pagegen import dispatch

            path = Path(args.table) if args.table else dispatch.table_path(args.gpu)
            storage, given = args.storage, args.storage is not None
            if storage is None:
                from pagegen.table import TableError, load

                try:
                    key = args.gpu or load(path).gpu_key
                except TableError:
                    key = args.gpu or ""
                cand = default_storage(key) if key else None
                storage = str(cand) if cand is not None and cand.is_file() else None
            data = gather(path, storage, storage_given=given, **ceil)
            if args.gpu and data.table.gpu_key != args.gpu:
                raise ReportError(f"{path} is the table of {data.table.gpu_key!r}, not of --gpu {args.gpu}",
                                  "give the table of that card or drop --gpu")
            page = R.write_report(data, args.out or f"report-{data.table.gpu_key}")
    except ReportError as exc:
        raise UsageError(exc.what, exc.fix) from None
    pngs = sorted(p.name for p in page.parent.glob("*.png"))
    print(f"wrote {page} ({len(pngs)} images beside it)")
    return 0


def add_subcommands(sub) -> None:
    """Register `pagegen report` on the CLI's subparsers."""
    p = sub.add_parser("report", help="HTML report (with PNGs) of a tuned table and its Optuna studies",
                       description="Draw what tuning found: rooflines against the card's measured ceilings, the "
                                   "gain over the heuristic, the held-out check, each study's history and parameter "
                                   'importances. Needs matplotlib: pip install "pagegen[report]".')
    p.add_argument("--gpu", help="GPU key: its table ($PAGEGEN_TUNED_TABLE or tuned/<key>.yaml) and default journal")
    p.add_argument("--table", help="tuned table file (default: the one of --gpu)")
    p.add_argument("--storage", help="Optuna storage the table was tuned with: journal file or database URL "
                                     "(default: pagegen tune's default journal of the card, when it exists)")
    p.add_argument("--compare", nargs=2, metavar=("A.yaml", "B.yaml"),
                   help="two tables side by side (two cards or two toolchains)")
    p.add_argument("--copy-gbps", type=_positive, help="the card's copy bandwidth in GB/s (default: the table's)")
    p.add_argument("--matmul-tflops", type=_positive, help="the card's matrix rate in TFLOP/s (default: the table's)")
    p.add_argument("--out", help="output folder (default report-<gpu key>, or report-compare)")
    p.set_defaults(func=cmd_report)
