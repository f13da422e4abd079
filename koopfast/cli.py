"""The ``koopfast`` command: ``koopfast bench`` (micro-benchmarks against the PyTorch way)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch


def _bench(args: argparse.Namespace) -> int:
    from koopfast.benchmarks import codes, harness, select

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("koopfast bench: --device cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"koopfast bench on {harness.describe_device(device)}{' (--quick)' if args.quick else ''}", flush=True)
    rows = []
    if args.family in ("all", "select"):
        select_rows = select.run(device, quick=args.quick, repeat=args.repeat)
        rows += select_rows
        print(harness.format_table(select_rows))
        print(
            f"\nvs baseline: {select.BASELINE} time / method time. GB/s: input bytes (one read) / median time;"
            f" % stream: of '{select.STREAM}'. Peak extra: memory beyond the inputs, outputs included.",
            flush=True,
        )
    if args.family in ("all", "codes"):
        codes_rows = codes.run(device, quick=args.quick, repeat=args.repeat)
        rows += codes_rows
        print(("\n" if args.family == "all" else "") + harness.format_table(codes_rows))
        print(
            f"\nvs baseline: '{codes.BOOL}' time / method time. GB/s: bytes a method must read at least (the"
            f" activations and kept codes; the codes alone for distances) / median time; % stream: of"
            f" '{codes.STREAM}'. Peak extra: memory beyond the inputs, outputs included.\n"
        )
        print(codes.memory_summary(codes_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": harness.describe_device(device), "quick": args.quick, "rows": [r.as_dict() for r in rows]},
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopfast", description="Fast pruning criteria for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="time koopfast's kernels against the PyTorch way, print a table",
        description="Micro-benchmarks: koopfast against what a PyTorch user would write, "
        "same inputs, results checked before timing.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes only (CI): N up to 10^7, 8 probe images")
    bench.add_argument(
        "--family",
        choices=("all", "select", "codes"),
        default="all",
        help="which kernels: threshold selection, region codes, or both (default)",
    )
    bench.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available)",
    )
    bench.add_argument("--repeat", type=int, default=None, help="timed runs per method (default: 7, 3 for slow ones)")
    bench.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
