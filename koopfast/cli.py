"""The ``koopfast`` command: ``koopfast demo`` (every criterion on real data, with plots) and
``koopfast bench`` (micro-benchmarks against the PyTorch way and the peers)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

FAMILIES = ("select", "masks", "koopman", "gradflow", "hvp", "codes", "distributed", "llm")


def _bench(args: argparse.Namespace) -> int:
    import importlib

    from koopfast.benchmarks import harness

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("koopfast bench: --device cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
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
    print("\n" + harness.legend(rows))
    from pathlib import Path

    from koopfast import plots

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = harness.describe_device(device)
    (out / "results.json").write_text(
        json.dumps({"device": device_name, "quick": args.quick, "rows": [r.as_dict() for r in rows]}, indent=2)
    )
    chart = plots.bench_speedups(rows, device_name, out / "speedups.png")
    print(f"wrote {out / 'results.json'}, {chart}")
    return 0


def _progress(enabled: bool):
    """tqdm progress bars when asked for and available (a plain iterator otherwise)."""
    if not enabled:
        return lambda it, desc: it
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda it, desc: it
    return lambda it, desc: tqdm(it, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # off without a tty


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from koopfast import demo

    try:
        config = demo.DemoConfig(
            hidden=args.hidden,
            epochs=args.epochs,
            sparsities=args.sparsities,
            fine_tune_epochs=args.fine_tune_epochs,
            window=args.window,
            seed=args.seed,
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.set_num_threads(min(torch.get_num_threads(), 2))  # tiny model: more threads only add overhead
    print("koopfast demo: every criterion on scikit-learn's digits, end to end", flush=True)
    result = demo.run(config, progress=_progress(not args.no_progress))
    print(demo.summary(result))
    print(
        "\ntest accuracy per criterion and sparsity: right after pruning -> after "
        f"{config.fine_tune_epochs} epochs of fine-tuning with the pruned weights held at zero"
    )
    print(demo.table(result))
    if result.mask_overlap:
        print(
            f"\noverlap of the criteria's masks at {result.mask_overlap['sparsity']:.0%} sparsity "
            "(kept weights in common / kept weights)"
        )
        print(demo.overlap_table(result))
    paths = demo.write(result, Path(args.out))
    print(f"\nwrote {', '.join(str(p) for p in paths)} ({result.seconds:.0f} s)")
    return 0


def _version() -> str:
    import koopfast

    info = koopfast.build_info()
    return f"koopfast {koopfast.__version__} (torch {info['torch_version']}, backends: {', '.join(info['backends'])})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koopfast",
        description="Fast pruning criteria for PyTorch. Commands: `koopfast demo` (every criterion on real data; "
        "tables, PNG plots and a JSON in ./koopfast-demo) and `koopfast bench` (micro-benchmarks against the "
        "PyTorch way and the peers; a table, results.json and speedups.png in ./koopfast-bench).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo",
        help="train on real data (scikit-learn's digits), prune with every criterion; prints tables, writes "
        "results.json and three PNG plots to --out",
        description="Trains an MLP with BatchNorm on scikit-learn's digits (nothing is downloaded) while "
        "recording its trajectory and running the early-bird detectors; scores it with every criterion "
        "(magnitude, KMP, KGP, loss preservation, gradient-norm preservation, GraSP, spline redundancy); "
        "prunes at each sparsity, fine-tunes briefly and prints test accuracy and mask overlaps; writes "
        "results.json (every number) and accuracy_vs_sparsity.png, koopman_eigenvalues.png and "
        "mask_overlap_over_training.png to --out. Seeded; about a minute on 2 CPU cores.",
    )
    demo.add_argument("--out", default="koopfast-demo", help="output folder (default: ./koopfast-demo)")
    demo.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    demo.add_argument("--hidden", type=_ints, default=(128, 64), help="hidden layer sizes (default 128,64)")
    demo.add_argument(
        "--sparsities",
        type=_floats,
        default=(0.5, 0.8, 0.9, 0.95),
        help="fractions to prune (default 0.5,0.8,0.9,0.95)",
    )
    demo.add_argument("--fine-tune-epochs", type=int, default=2, help="fine-tuning epochs after pruning (default 2)")
    demo.add_argument("--window", type=int, default=64, help="snapshots in the Koopman window (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser(
        "bench",
        help="time koopfast against the PyTorch way and the peers; prints a table, writes results.json and "
        "speedups.png to --out",
        description="Micro-benchmarks: koopfast against what a PyTorch user would write and the peers, same "
        "inputs, results checked before timing. Prints a table per family; writes results.json (every row) and "
        "speedups.png (each method's speed relative to its case's baseline) to --out. The full run takes "
        "15-20 minutes on 2 CPU cores; --quick about 2.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes only (CI)")
    bench.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda if available)",
    )
    bench.add_argument("--repeat", type=int, default=None, help="timed runs per method (default: 7, 3 for slow ones)")
    bench.add_argument(
        "--out", default="koopfast-bench", help="folder for results.json and speedups.png (default: ./koopfast-bench)"
    )
    bench.add_argument("--only", metavar="FAMILIES", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `koopfast`: what it can do
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
