"""Collects what scripts/gpu_check.sh wrote into one summary.json and prints a short table.

Usage: gpu_check_summary.py OUT --device cuda|cpu --size SIZE --budget S --seconds S

Reads OUT/steps.tsv (one line per step: status, exit code, seconds), OUT/tests.xml (pytest's JUnit
report) and OUT/bench-*/results.json (one per benchmark family). A streaming row is one that moves
a known number of bytes on the checked device: it carries GB/s and the fraction of a device copy of
the same bytes measured in the same run; koopfast's streaming rows under TARGET of that copy are
listed. Exits 1 if a step that passed left no usable output (the check itself is broken).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TARGET = 0.7  # issue 15: every streaming kernel at >= 70 % of the measured copy bandwidth


def read_steps(out: Path) -> list[dict]:
    with open(out / "steps.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        r["rc"] = int(r["rc"]) if r["rc"] else None
        r["seconds"] = int(r["seconds"])
        r["timeout_s"] = int(r["timeout_s"])
    return rows


def read_tests(out: Path) -> dict | None:
    path = out / "tests.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_names"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def read_bench(out: Path, device: str) -> tuple[dict, list[str]]:
    """Per family: metadata, warnings, copy bandwidths and the streaming rows; and the problems."""
    families, problems = {}, []
    for path in sorted(out.glob("bench-*/results.json")):
        family = path.parent.name.removeprefix("bench-")
        try:
            results = json.loads(path.read_text())
            rows = results["rows"]
            meta = results["metadata"]
        except (ValueError, KeyError) as exc:
            problems.append(f"{path}: not a koopfast bench results.json ({exc!r})")
            continue
        streaming = [
            {
                "case": r["case"], "method": r["method"], "n": r["n"], "median_ms": r["median_ms"],
                "spread": r["spread"], "noisy": r["noisy"], "gbps": r["gbps"], "copy_gbps": r["copy_gbps"],
                "pct_of_copy": round(100 * r["copy_fraction"], 1),
            }
            for r in rows
            if r["device"] == device and r["copy_fraction"] is not None
        ]  # fmt: skip
        families[family] = {
            "results": str(path.relative_to(out)),
            "size": results["family_sizes"].get(family),
            "rows": len(rows),
            "warnings": results["warnings"],
            "copy_bandwidth": results["copy_bandwidth"],
            "streaming": streaming,
            "git_commit": meta["git_commit"],
            "git_dirty": meta["git_dirty"],
            "device": meta["device"],
        }
    return families, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", required=True)
    parser.add_argument("--size", required=True)
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--seconds", type=int, required=True)
    args = parser.parse_args(argv)
    steps = read_steps(args.out)
    tests = read_tests(args.out)
    families, problems = read_bench(args.out, args.device)
    for s in steps:
        family = s["step"].removeprefix("bench-")
        if s["step"].startswith("bench-") and s["status"] == "ok" and family not in families:
            problems.append(f"{s['step']} passed but wrote no results.json")
        if s["step"] == "tests" and s["status"] == "ok" and tests is None:
            problems.append("tests passed but wrote no tests.xml")
    streaming = [dict(row, family=f) for f, fam in families.items() for row in fam["streaming"]]
    below = [r for r in streaming if r["method"].startswith("koopfast") and r["pct_of_copy"] < 100 * TARGET]
    summary = {
        "device": args.device,
        "size": args.size,
        "budget_s": args.budget,
        "seconds": args.seconds,
        "within_budget": args.seconds <= args.budget,
        "passed": all(s["status"] in ("ok", "not needed") for s in steps) and not problems,
        "steps": steps,
        "tests": tests,
        "bench": families,
        "copy_target": TARGET,
        "koopfast_streaming_below_target": [f"{r['family']}: {r['case']} | {r['method']}" for r in below],
        "problems": problems,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary, streaming))
    for p in problems:
        print(f"gpu_check: PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def table(summary: dict, streaming: list[dict]) -> str:
    lines = [f"gpu_check summary ({summary['device']}, --size {summary['size']}, {summary['seconds']} s "
             f"of {summary['budget_s']} s)"]  # fmt: skip
    for s in summary["steps"]:
        lines.append(f"  {s['step']:<16} {s['status']:<8} {s['seconds']:>4} s")
    t = summary["tests"]
    if t is not None:
        lines.append(f"  tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")
        lines += [f"    FAILED {name}" for name in t["failed_names"][:20]]
    if streaming:
        width = max(len(f"{r['case']} | {r['method']}") for r in streaming)
        lines.append(f"  {'streaming row':<{width}}  {'GB/s':>8}  {'copy GB/s':>9}  {'% copy':>6}  spread")
        for r in streaming:
            spread = "" if r["spread"] is None else f"{r['spread']:.2f}{' !' if r['noisy'] else ''}"
            lines.append(
                f"  {r['case'] + ' | ' + r['method']:<{width}}  {r['gbps']:8.1f}  {r['copy_gbps']:9.1f}  "
                f"{r['pct_of_copy']:5.1f}%  {spread}"
            )
    for family, fam in summary["bench"].items():
        lines += [f"  WARNING ({family}): {w}" for w in fam["warnings"]]
    below = summary["koopfast_streaming_below_target"]
    lines.append(f"  koopfast streaming rows under {100 * summary['copy_target']:.0f} % of copy: {len(below)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
