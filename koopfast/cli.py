"""The ``koopfast`` command: ``koopfast bench`` (micro-benchmarks against the PyTorch way)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

FAMILIES = ("select", "masks", "koopman", "gradflow", "codes")


def _bench(args: argparse.Namespace) -> int:
    import importlib

    from koopfast.benchmarks import harness

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("koopfast bench: --device cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
    families = args.family or FAMILIES
    print(f"koopfast bench on {harness.describe_device(device)}{' (--quick)' if args.quick else ''}", flush=True)
    families = FAMILIES if args.only is None else tuple(args.only.split(","))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"koopfast bench: unknown families {unknown}; choose among {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    rows = []
    for family in families:
        module = importlib.import_module(f"koopfast.benchmarks.{family}")
        print(f"\n[{family}] {module.__doc__.strip().splitlines()[0]}", flush=True)
        family_rows = module.run(device, quick=args.quick, repeat=args.repeat)
        print(harness.format_table(family_rows), flush=True)
        if hasattr(module, "summary"):
            print(module.summary(family_rows), flush=True)
        rows += family_rows
    print(
        "\nvs baseline: the baseline's time / the method's time (per family: torch.kthvalue; PyDMD, or the authors'"
        " code without PyDMD; the PyTorch record). GB/s: bytes that must move / median time; % stream: of a plain"
        " streaming read. Peak extra: memory beyond the inputs, outputs included."
    )
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
    bench.add_argument("--quick", action="store_true", help="small sizes only (CI)")
    bench.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available)",
    )
    bench.add_argument("--repeat", type=int, default=None, help="timed runs per method (default: 7, 3 for slow ones)")
    bench.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    bench.add_argument("--only", metavar="FAMILIES", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
