"""The ``koopfast`` command: ``koopfast demo`` (every criterion on real data, with plots) and
``koopfast bench`` (micro-benchmarks against the PyTorch way and the peers)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

FAMILIES = ("select", "masks", "koopman", "gradflow", "hvp", "codes", "distributed", "llm")


SIZES = ("quick", "default", "large")


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from koopfast import plots
    from koopfast.benchmarks import harness, provenance

    size = args.size or ("quick" if args.quick else "default")
    if args.quick and size != "quick":
        print(f"koopfast bench: --quick contradicts --size {size}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("koopfast bench: --device cuda requested, but torch sees no CUDA device", file=sys.stderr)
        return 2
    families = FAMILIES if args.only is None else tuple(args.only.split(","))
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"koopfast bench: unknown families {unknown}; choose among {', '.join(FAMILIES)}", file=sys.stderr)
        return 2
    device_name = harness.describe_device(device)
    print(f"koopfast bench on {device_name} (--size {size})", flush=True)
    metadata = provenance.run_metadata(
        command=["koopfast", *args.argv], device=device, repeat=args.repeat, size=size, families=families,
        noisy_spread=harness.NOISY_SPREAD,
    )  # fmt: skip
    rows, copies, sizes = [], [], {}
    for family in families:
        family_rows, family_copies, sizes[family] = _bench_family(family, device, size, args.repeat)
        rows += family_rows
        copies += family_copies
    warnings = harness.noise_warnings(rows)
    print("\n" + harness.legend(rows))
    for warning in warnings:
        print(f"WARNING: {warning}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "device": device_name,
        "quick": size == "quick",
        "size": size,
        "family_sizes": sizes,
        "metadata": metadata,
        "warnings": warnings,
        "copy_bandwidth": copies,
        "rows": [r.as_dict() for r in rows],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    chart = plots.bench_speedups(rows, device_name, out / "speedups.png")
    print(f"wrote {out / 'results.json'}, {chart}")
    return 0


def _bench_family(family: str, device: torch.device, size: str, repeat: int | None):
    """Run one family at ``size`` and print its table: (rows, copy measurements, size it ran at).
    Families whose ``run`` takes ``large`` have cases that fill a GPU; the others run their default
    sizes under --size large."""
    import importlib
    import inspect

    from koopfast.benchmarks import harness

    module = importlib.import_module(f"koopfast.benchmarks.{family}")
    print(f"\n[{family}] {module.__doc__.strip().splitlines()[0]}", flush=True)
    options = {"quick": size == "quick", "repeat": repeat}
    if size == "large" and "large" in inspect.signature(module.run).parameters:
        options["large"] = True
    ran_at = "large" if options.get("large") else "quick" if size == "quick" else "default"
    if size == "large" and ran_at != "large":
        print(f"{family}: no large cases, runs its default sizes", flush=True)
    rows = module.run(device, **options)
    copies = harness.fill_copy_fractions(rows)  # after the family returned: its inputs are freed
    harness.mark_noise(rows)
    print(harness.format_table(rows), flush=True)
    if hasattr(module, "summary"):
        print(module.summary(rows), flush=True)
    return rows, copies, ran_at


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


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from koopfast import study

    try:
        seeds = args.seeds if args.seeds is not None else (3 if args.quick else 20)
        config = study.StudyConfig.quick_config(seeds) if args.quick else study.StudyConfig(seeds=seeds)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny models: threads only add overhead, and spin on a busy machine
    print(f"koopfast study: the papers' comparisons over {seeds} seeds on scikit-learn's digits", flush=True)
    result = study.run(config, progress=_progress(not args.no_progress))
    print(study.markdown(result))
    paths = study.write(result, Path(args.out))
    print(f"wrote {', '.join(str(p) for p in paths)} ({result.seconds:.0f} s)")
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
    study = sub.add_parser(
        "study",
        help="the papers' comparisons over several seeds: mean, 95 %% t interval and verdict per claim; writes "
        "study.md, study.json and PNG figures with error bars to --out",
        description="Runs the comparisons behind the papers' claims (gradient flow: magnitude vs loss "
        "preservation, gradient-norm preservation vs GraSP; Koopman: KMP vs magnitude early and at convergence; "
        "early birds: spline vs mask-distance detection epoch) once per seed on scikit-learn's digits; reports "
        "per comparison the mean, a 95 % confidence interval (Student t over seeds) and the per-seed values, "
        "and whether the interval supports the claim. Single-threaded: about 5 s per seed on an idle core; --quick "
        "(3 seeds, smaller sizes) about 15 s.",
    )
    study.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default 20: fewer leave three of the six claims inconclusive; 3 with --quick)",
    )
    study.add_argument("--quick", action="store_true", help="small sizes and 3 seeds (CI)")
    study.add_argument("--out", default="koopfast-study", help="output folder (default: ./koopfast-study)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=_study)
    bench = sub.add_parser(
        "bench",
        help="time koopfast against the PyTorch way and the peers; prints a table, writes results.json and "
        "speedups.png to --out",
        description="Micro-benchmarks: koopfast against what a PyTorch user would write and the peers, same "
        "inputs, results checked before timing. Prints a table per family; writes results.json (every row, and "
        "the date, commit, command, versions, device, threads and repeat count of the run) and speedups.png "
        "(each method's speed relative to its case's baseline) to --out. Each row also shows its spread (median / "
        "fastest run, flagged above 1.3: a busy machine) and the fraction of a device copy of the same bytes. "
        "The full run takes 15-20 minutes on 2 CPU cores; --quick about 2.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes only (CI); the same as --size quick")
    bench.add_argument(
        "--size",
        choices=SIZES,
        help="quick: small sizes (CI); default: the sizes of bench/RESULTS.md; large: sizes that fill a GPU "
        "(N = 10^9 where a family has such cases; others run their default sizes)",
    )
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in results.json
    if args.command is None:  # a bare `koopfast`: what it can do
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
