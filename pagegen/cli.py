"""`pagegen` command line: argument parsing and printing only; the logic lives in the modules."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from pagegen import cli_report
from pagegen import spec as S
from pagegen.cli_errors import USAGE_EXIT, UsageError


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def cmd_list(args: argparse.Namespace) -> int:
    """Print the variant space: every axis, its legal values, and the size of the product."""
    specs = list(
        S.enumerate_specs(
            families=args.family or S.FAMILIES,
            head_dims=args.head_dim or S.HEAD_DIMS,
            block_sizes=args.block_size or S.BLOCK_SIZES,
            layouts=args.layout or S.LAYOUTS,
            dtypes=args.dtype or S.DTYPES,
            group_sizes=args.group_size or S.COMMON_GROUP_SIZES,
        )
    )
    print("pagegen variant space")
    print(f"  family      : {', '.join(S.FAMILIES)}")
    print(f"  head_dim    : {', '.join(map(str, S.HEAD_DIMS))}  (non-powers of two padded and masked)")
    print(f"  block_size  : {', '.join(map(str, S.BLOCK_SIZES))}")
    print(f"  layout      : {', '.join(S.LAYOUTS)}  (NHD [nb, bs, Hkv, D]; HND [nb, Hkv, bs, D])")
    print(f"  dtype       : {', '.join(S.DTYPES)}  (fp32 accumulation; kv_dtype = dtype)")
    print(f"  group_size  : any 1..{S.MAX_GROUP_SIZE}; listed: {', '.join(map(str, S.COMMON_GROUP_SIZES))}")
    print(f"  q_len       : {', '.join(map(str, S.Q_LENS))}  (decode: new tokens per sequence at most, speculative "
          "verify; not enumerated here)")
    print("tunables (Config)")
    print(f"  block_n     : {', '.join(map(str, S.BLOCK_N_VALUES))}")
    print(f"  block_m     : {', '.join(map(str, S.BLOCK_M_VALUES))}  (extend)")
    print(f"  num_warps   : {', '.join(map(str, S.NUM_WARPS_VALUES))}")
    print(f"  num_stages  : {', '.join(map(str, S.NUM_STAGES_VALUES))}")
    print(f"  split_size  : {', '.join(map(str, S.SPLIT_SIZE_VALUES))}  (decode; 0 = no split-KV)")
    by_family = Counter(s.family for s in specs)
    print("specs in the selection:")
    for fam in S.FAMILIES:
        if by_family[fam]:
            n_cfg = len(S.config_space(next(s for s in specs if s.family == fam)))
            print(f"  {fam:<12}{by_family[fam]:>6} specs   ({n_cfg} legal configs for the first)")
    print(f"  total       {len(specs):>6} specs")
    if args.keys:
        for s in specs:
            print(s.variant_key())
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    """Print (or write with --out) the generated Triton source of one spec."""
    from pagegen import codegen

    try:
        spec = S.KernelSpec(
            family=args.family, head_dim=args.head_dim, block_size=args.block_size, layout=args.layout,
            dtype=args.dtype, group_size=args.group_size, q_len=args.q_len,
        )
        config = None
        if args.config:
            pairs = dict(item.split("=", 1) for item in _str_list(args.config))
            config = S.Config.from_dict({k: int(v) for k, v in pairs.items()})
            reason = S.keep(spec, config)
            if reason:
                raise ValueError(f"config not legal for {spec.variant_key()}: {reason}")
    except (ValueError, TypeError) as exc:
        print(f"pagegen render: {exc}", file=sys.stderr)
        return 2
    source = codegen.render(spec, config)
    if args.out:
        Path(args.out).write_text(source)
        print(f"wrote {args.out} ({spec.variant_key()}, {len(source.splitlines())} lines)")
    else:
        sys.stdout.write(source)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagegen", description="Generate, tune and inspect paged-attention kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="show the variant space and its size")
    p.add_argument("--family", type=_str_list, help="comma list of families")
    p.add_argument("--head-dim", type=_int_list)
    p.add_argument("--block-size", type=_int_list)
    p.add_argument("--layout", type=_str_list)
    p.add_argument("--dtype", type=_str_list)
    p.add_argument("--group-size", type=_int_list)
    p.add_argument("--keys", action="store_true", help="also print every variant key")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("render", help="print the generated Triton source of one spec")
    p.add_argument("--family", default="decode", choices=S.FAMILIES)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layout", default="NHD")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--q-len", type=int, default=1,
                   help=f"decode: new tokens per sequence at most ({', '.join(map(str, S.Q_LENS))}; spec. verify)")
    p.add_argument("--config", help="launch config recorded in the header, e.g. block_n=64,num_warps=4,split_size=512")
    p.add_argument("--out", help="write the source here instead of stdout")
    p.set_defaults(func=cmd_render)

    try:
        from pagegen import cli_tune
    except ImportError:
        cli_tune = None
    if cli_tune is not None:
        cli_tune.add_subcommands(sub)
    cli_report.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `pagegen` command; a UsageError prints one line (no traceback) and exits 2."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `tune` starts its workers from it
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(exc.line(args.command), file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())
