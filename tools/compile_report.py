"""Static compile report of every Triton kernel (no GPU needed).

    python -m tools.compile_report [--arch 90] [--arch 80] [--configs all|default]
                                        [--csv out.csv] [--jobs N] [--no-sass]

Compiles each kernel config ahead of time for the given archs (sm_90 by default) and prints
registers, local-memory spills, shared memory, the estimated occupancy and whether tensor-core
instructions (HMMA / HGMMA) appear. Built on `tools.compile_check`.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import List, Tuple

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.pop("TRITON_INTERPRET", None)  # a report compiles, it never interprets (and forks workers)

from tools import compile_check as cc  # noqa: E402

_SPECS: list = []  # set before the worker pool forks


def _job(job: Tuple[int, int, int, bool]) -> cc.CompileResult:
    spec_i, cfg_i, arch, sass = job
    spec = _SPECS[spec_i]
    return cc.compile_config(spec, spec.configs[cfg_i], arch, sass=sass)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.compile_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", choices=sorted(cc.LIMITS),
                    help="target compute capability, repeatable (default: 90)")
    ap.add_argument("--configs", choices=["all", "default"], default="all",
                    help="every autotune config, or only the default one (default: all)")
    ap.add_argument("--modules", nargs="+", default=list(cc.KERNEL_MODULES), help="kernel modules to report")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this text")
    ap.add_argument("--csv", help="also write every row to this CSV file")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--no-sass", action="store_true",
                    help="read tensor-core use from the PTX instead of disassembling the cubin")
    args = ap.parse_args(argv)
    archs = args.arch or [90]

    specs, problems = cc.collect_specs(args.modules, strict=False)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    specs = [s for s in specs if args.filter in s.name]
    _SPECS[:] = specs
    jobs: List[Tuple[int, int, int, bool]] = [
        (i, j, arch, not args.no_sass)
        for i, spec in enumerate(specs) for arch in archs for j, cfg in enumerate(spec.configs)
        if args.configs == "all" or cfg.default
    ]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_job, jobs))
    else:
        results = [_job(j) for j in jobs]
    print(cc.format_table(results))

    bad_default = [r for r in results if r.ok and r.default and (r.spills or not r.fits_shared)]
    errors = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiles of {len(specs)} kernels for sm_{', sm_'.join(map(str, archs))} "
          f"in {time.perf_counter() - t0:.0f} s: {len(errors)} failed, "
          f"{len(bad_default)} default configs spill or exceed shared memory")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(cc.COLUMNS))
            w.writeheader()
            w.writerows(cc.as_row(r) for r in results)
        print(f"wrote {args.csv}")
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
