"""python -m bench [--store models_store] [--quick] [--only NAME] [--out bench_results]

Runs the scenarios (see scenarios.py), prints the table, writes <out>/latest.json and <out>/bench.png, and on
a full run (neither --quick nor --only) also docs/images/bench.png and the generated part of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
import traceback
from pathlib import Path

from bench import abandon, compare, guidance, memory, overload, report, scenarios
from bench.cpu import CpuMeter
from bench.load import Windows
from bench.scenarios import Context, load_digits
from bench.server import REPO

SCENARIOS = {"logprob": scenarios.logprob, "gan": scenarios.gan, "batching": scenarios.batching,
             "sampling": scenarios.sampling, "iteration": scenarios.iteration, "litserve": compare.litserve,
             "overload": overload.overload, "soak": overload.soak,
             "abandon": abandon.abandon, "guidance": guidance.guidance, "memory": memory.memory}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--store", type=Path, default=Path("models_store"), help="model store (default: models_store)")
    p.add_argument("--quick", action="store_true", help="short windows and runs: a smoke test, not a measurement")
    p.add_argument("--only", choices=sorted(SCENARIOS), help="run one scenario")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="results folder (default: bench_results)")
    p.add_argument("--docs", choices=("auto", "always", "never"), default="auto",
                   help="update docs/benchmarks.md and docs/images/bench.png (auto: only on a full run)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a floor fails")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    store = args.store.resolve()
    if not (store / "pixelcnn").is_dir() or not (store / "gan").is_dir():
        print(f"no model store at {store} (train with `make train`, or pass --store)", file=sys.stderr)
        return 2
    windows = Windows(0.5, 4) if args.quick else Windows(2.0, 8)
    digits, source = load_digits()
    ctx = Context(store, args.quick, windows, digits, source)
    names = [args.only] if args.only else list(SCENARIOS)
    run: dict = {"machine": report.machine(), "store": str(store), "quick": args.quick, "digits": source,
                 "windows": dataclasses.asdict(windows), "scenarios": {}, "failed": {}}
    for name in names:
        print(f"== {name}", flush=True)
        t = time.monotonic()
        meter = CpuMeter()
        try:
            run["scenarios"][name] = SCENARIOS[name](ctx) | {"elapsed_s": time.monotonic() - t}
            run["scenarios"][name]["cpu_elsewhere"] = used = meter.read()
            if used["others_share"] > 0.05:
                print(f"  warning: other processes (or the hypervisor) took {used['others_share']:.0%} of the "
                      f"machine during {name}: its figures are disturbed", flush=True)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            traceback.print_exc()
            run["failed"][name] = f"{type(exc).__name__}: {exc}"
    run["elapsed_s"] = time.monotonic() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(run, args.out / "latest.json")
    plotted = report.plot(run, args.out / "bench.png")
    print()
    print(report.terminal(run))
    if args.docs == "always" or (args.docs == "auto" and not args.quick and not args.only and not run["failed"]):
        rel = None
        if plotted:
            (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.out / "bench.png", REPO / "docs" / "images" / "bench.png")
            rel = "images/bench.png"
        report.update_doc(REPO / "docs" / "benchmarks.md", report.markdown(run, rel))
        print("\nupdated docs/benchmarks.md" + (" and docs/images/bench.png" if plotted else ""))
    print(f"\nresults: {args.out / 'latest.json'}; took {run['elapsed_s']:.0f} s")
    if run["failed"]:
        print(f"scenarios failed: {run['failed']}", file=sys.stderr)
        return 1
    failed = [f["name"] for f in report.all_floors(run) if not f["pass"]]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
