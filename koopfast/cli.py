"""The ``koopfast`` command: ``koopfast bench`` (micro-benchmarks against the PyTorch way)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

FAMILIES = ("select", "masks")


def _bench(args: argparse.Namespace) -> int:
    from koopfast.benchmarks import harness, select

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("koopfast bench: --device cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
    families = args.family or FAMILIES
    print(f"koopfast bench on {harness.describe_device(device)}{' (--quick)' if args.quick else ''}", flush=True)
    rows = []
    if "select" in families:
        rows += select.run(device, quick=args.quick, repeat=args.repeat)
        print(harness.format_table(rows))
        print(
            f"\nvs baseline: {select.BASELINE} time / method time. GB/s: input bytes (one read) / median time;"
            f" % stream: of '{select.STREAM}'. Peak extra: memory beyond the inputs, outputs included."
        )
    if "masks" in families:
        rows += _bench_masks(device, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": harness.describe_device(device), "quick": args.quick, "rows": [r.as_dict() for r in rows]},
                f,
                indent=2,
            )
        print(f"wrote {args.json}")
    return 0


def _bench_masks(device: torch.device, args: argparse.Namespace) -> list:
    from koopfast.benchmarks import harness, masks

    rows = []
    for title, run, note in [
        (
            "masks: fused apply",
            masks.run_apply,
            f"vs baseline: '{masks.APPLY_BASELINE}' time / method time. GB/s: bytes that must move (tensors read"
            f" and written, masks read) / median time; % stream: of '{masks.APPLY_STREAM}'.",
        ),
        (
            "masks: global pruning",
            masks.run_global,
            f"vs baseline: '{masks.GLOBAL_BASELINE}' time / method time. Peak extra: memory beyond the unpruned"
            " model, the pruned state it leaves included.",
        ),
        (
            "masks: cost of a pruned model",
            masks.run_overhead,
            f"vs baseline: '{masks.OVERHEAD_BASELINE}' time / method time; the note compares with the dense model.",
        ),
    ]:
        part = run(device, quick=args.quick, repeat=args.repeat)
        print(f"\n{title}\n{harness.format_table(part)}")
        for r in part:
            if r.note:
                print(f"  {r.case.split(':')[0]}, {r.method}: {r.note}")
        print(note, flush=True)
        rows += part
    sizes = masks.storage_sizes(10**6 if args.quick else 10**7)
    reference = sizes["torch.save float32 masks"]
    print("\nmasks on disk (the same masks, 90 % sparsity):")
    for name, size in sizes.items():
        print(f"  {name:<28} {size / 2**20:9.2f} MiB  {100 * size / reference:6.2f} % of float32")
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopfast", description="Fast pruning criteria for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="time koopfast's kernels against the PyTorch way, print a table",
        description="Micro-benchmarks: koopfast against what a PyTorch user would write, "
        "same inputs, results checked before timing.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes only (CI): N up to 10^7")
    bench.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available)",
    )
    bench.add_argument("--repeat", type=int, default=None, help="timed runs per method (default: 7, 3 for slow ones)")
    bench.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    bench.add_argument(
        "--family", choices=FAMILIES, action="append", help="run only this family (repeatable; default: all)"
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
