"""`pagegen` command line: argument parsing and printing only; the logic lives in the modules."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path
from typing import NoReturn

from pagegen import cli_report
from pagegen import spec as S
from pagegen.cli_errors import USAGE_EXIT, UsageError


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (bad flag values, unknown flags) are one line in the UsageError shape
    instead of a usage block; the subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        fix = f"see `{self.prog} --help`"
        line = UsageError(message, fix).line(command) if command else f"{self.prog}: {message}; {fix}"
        self.exit(USAGE_EXIT, line + "\n")


def _int_list(text: str) -> tuple[int, ...]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not all(x.isascii() and x.lstrip("-").isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    return tuple(int(x) for x in items)


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_SPEC_FIELDS = {f.name for f in dataclasses.fields(S.KernelSpec)}


def _spec_error(exc: Exception) -> UsageError:
    """A spec's ValueError/TypeError ("head_dim=72 is not supported; supported: ...") as a UsageError
    whose fix names the flag."""
    text = str(exc)
    axis = text.split("=", 1)[0]
    flag = f"--{axis.replace('_', '-')}" if axis in _SPEC_FIELDS else "the spec flags"
    return UsageError(text, f"change {flag} (`pagegen list` shows every legal value)")


def _parse_config(text: str) -> S.Config:
    """--config "block_n=64,num_warps=4" -> a validated Config (UsageError otherwise)."""
    example = "write it as name=int pairs, e.g. --config block_n=64,num_warps=4,split_size=512"
    values: dict[str, int] = {}
    for item in _str_list(text):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not name:
            raise UsageError(f"--config item {item!r} is not name=value", example)
        if not (value.isascii() and value.lstrip("-").isdigit()):
            raise UsageError(f"--config {name}={value!r} is not an integer", example)
        if name in values:
            raise UsageError(f"--config gives {name} twice", example)
        values[name] = int(value)
    try:
        return S.Config.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--config: {exc}", "`pagegen list` shows every tunable's legal values") from None


def cmd_list(args: argparse.Namespace) -> int:
    """Print the variant space: every axis, its legal values, and the size of the product."""
    try:
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
    except (ValueError, TypeError) as exc:
        raise _spec_error(exc) from None
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
    except (ValueError, TypeError) as exc:
        raise _spec_error(exc) from None
    config = None
    if args.config:
        config = _parse_config(args.config)
        from pagegen._checks import IllegalConfigError, check_config

        try:
            check_config(spec, config)
        except IllegalConfigError as exc:
            raise UsageError(f"--config is not legal for {spec.variant_key()}: {exc.reason}",
                             "pick other values (`pagegen list` shows the tunables)") from None
    source = codegen.render(spec, config)
    if args.out:
        try:
            Path(args.out).write_text(source)
        except OSError as exc:
            raise UsageError(f"cannot write --out {args.out}: {exc.strerror or exc}",
                             "create its folder first, or pass a writable path") from None
        print(f"wrote {args.out} ({spec.variant_key()}, {len(source.splitlines())} lines)")
    else:
        sys.stdout.write(source)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pagegen", description="Generate, tune and inspect paged-attention kernels.")
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
