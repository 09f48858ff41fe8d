"""`python -m benchmarks.quality`: does the memory help? Every model variant on MQAR and byte-level LM.

Trains each variant of benchmarks/variants.py with quality tasks (those this HOPEConfig accepts) with
the same width, depth, optimizer and budget on
  - MQAR (benchmarks/quality/mqar.py): the main setting (4 pairs, 16 tokens, 3,000 steps) and a
    sweep of the number of key-value pairs (2 and 8 pairs in 32 tokens, 1,000 steps);
  - byte-level LM on hope.data's embedded corpus: validation bits/byte at equal steps (600; parameter
    counts in the table; one Transformer row has the seed HOPE's parameter count),
one seed each: about 17 minutes on an idle 2-core CPU (measured in
benchmarks/results/quality_cpu-2core_2026-11-26_default). `--full` runs three seeds of the main setting
and of the LM, and the pairs, sequence-length and width sweeps at 2,000 steps (hours). It prints a table
and writes quality.csv / quality.json (every run, with its learning curve), table.txt, summary.md and
PNG plots into --out. Runs append to runs.jsonl as they finish, and a rerun with the same --out resumes
(also to add seeds or variants to an earlier run).

`--plan zoology | zoology-cpu | zoology-toy` runs MQAR on Zoology's grid with their learning-rate sweep
(best rate per cell), `--plan niah | niah-toy` needle retrieval at 1x, 4x and 16x the training length
(benchmarks/quality/plans.py); `--device cuda` trains on the GPU.
"""
from __future__ import annotations

import argparse
import calendar
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import plans, suite
from .runner import finished, run_all
from ..variants import VARIANTS, available, variant


def _seeds(text: str):
    return tuple(int(s) for s in text.split(",") if s.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(plans.PLANS), default=None,
                   help="the Zoology MQAR grid or the needle plan instead of the default suite")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--cells", default=None, help="--plan zoology*: (T)x(N) cells, e.g. 64x4,128x8 (default: the plan's)")
    p.add_argument("--lrs", default=None, help="--plan zoology*: learning rates, e.g. 2.2e-3,1e-2 (default: the plan's)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report of the plan's runs already in --out/runs.jsonl")
    p.add_argument("--quick", action="store_true", help="a tiny plan (seconds): checks the pipeline end to end")
    p.add_argument("--full", action="store_true",
                   help="three seeds of the main setting and the LM, and all three sweeps at 2,000 steps (hours)")
    p.add_argument("--out", default=None, help="output folder (default: quality_out/, or quality_quick/ with --quick)")
    p.add_argument("--workers", type=int, default=None,
                   help="training processes at once, 1 thread each (default: 2, 1 with --quick)")
    p.add_argument("--variants", default=None, help=f"comma list of variant names or keys (default: all of {[v.key for v in VARIANTS if v.tasks]})")
    p.add_argument("--main-seeds", default=None, help="seeds of the main MQAR setting (default 0; --full 0,1,2)")
    p.add_argument("--sweep-seeds", default=None, help="seeds of the MQAR sweeps (default 0)")
    p.add_argument("--lm-seeds", default=None, help="seeds of the LM runs (default 0; --full 0,1,2)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="training steps of the MQAR sweeps (default 1000; --full 2000)")
    p.add_argument("--pairs", default=None, help="numbers of key-value pairs of the pairs sweep (default 2,8; "
                                                 "--full 2,4,8)")
    p.add_argument("--widths", default=None, help="model widths of the width sweep (default none; --full 32,64,128)")
    p.add_argument("--lm-steps", type=int, default=None, help="training steps of the LM runs (default 600)")
    p.add_argument("--reuse", nargs="*", default=(),
                   help="runs.jsonl files of earlier runs (e.g. the ablation's): a run with the same "
                        "signature (config, task, budget, seed) is copied instead of trained again")
    a = p.parse_args(argv)
    if a.quick and a.full:
        p.error("--quick and --full exclude each other")
    if a.plan and (a.quick or a.full):
        p.error("--plan excludes --quick and --full")
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    plan = suite.QUICK if a.quick else suite.FULL if a.full else suite.DEFAULT
    for arg, fieldname in ((a.main_seeds, "main_seeds"), (a.sweep_seeds, "sweep_seeds"), (a.lm_seeds, "lm_seeds")):
        if arg is not None:
            plan = dataclasses.replace(plan, **{fieldname: _seeds(arg)})
    if a.sweep_steps is not None:
        plan = dataclasses.replace(plan, sweep_steps=a.sweep_steps)
    if a.pairs is not None:
        plan = dataclasses.replace(plan, pairs=(plan.pairs[0], _seeds(a.pairs)))
    if a.widths is not None:
        plan = dataclasses.replace(plan, widths=(plan.widths[0], _seeds(a.widths)))
    if a.lm_steps is not None:
        plan = dataclasses.replace(plan, lm={**plan.lm, "steps": a.lm_steps})
    out = Path(a.out or (f"quality_{a.plan}" if a.plan else "quality_quick" if a.quick else "quality_out"))
    out.mkdir(parents=True, exist_ok=True)
    workers = a.workers or (12 if a.device == "cuda" else 1 if a.quick or a.plan else 2)
    names = None if a.variants is None else [s.strip() for s in a.variants.split(",")]
    try:
        wanted = [v for v in (VARIANTS if names is None else [variant(n) for n in names]) if v.tasks]
    except ValueError as e:
        p.error(str(e))
    variants = available([v.name for v in wanted])
    skipped = [v.name for v in wanted if v not in variants]
    torch.set_num_threads(1)
    if a.plan:
        zplan = plans.PLANS[a.plan]
        if (a.cells or a.lrs) and not isinstance(zplan, plans.ZooPlan):
            p.error("--cells and --lrs apply to the zoology plans")
        try:
            if a.cells:
                zplan = dataclasses.replace(zplan, cells=tuple(tuple(int(v) for v in c.split("x"))
                                                               for c in a.cells.split(",")))
            if a.lrs:
                zplan = dataclasses.replace(zplan, lrs=tuple(float(v) for v in a.lrs.split(",")))
        except ValueError:
            p.error(f"--cells must be TxN,... and --lrs numbers, got {a.cells!r}, {a.lrs!r}")
    jobs = plans.jobs(zplan, variants, a.device) if a.plan else suite.jobs(plan, variants)
    print(f"{len(jobs)} training runs, {workers} at a time, into {out}/")
    t0, started, load0 = time.time(), time.strftime("%Y-%m-%d %H:%M", time.gmtime()), os.getloadavg()
    if a.report_only:
        records = finished(jobs, out / "runs.jsonl")
        print(f"report of the {len(records)} of {len(jobs)} runs in {out / 'runs.jsonl'}")
    else:
        records = run_all(jobs, out / "runs.jsonl", workers, reuse=[Path(r) for r in a.reuse])
    if a.report_only and records:   # the runs' own times: the first start to the last finish
        first = min(records, key=lambda r: r["finished"])
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(
            calendar.timegm(time.strptime(first["finished"], "%Y-%m-%dT%H:%M:%SZ")) - first["wall_s"]))
        t0 = time.time() - sum(r["wall_s"] for r in records)
        load0 = (first["load_start"],) * 3
    meta = {"command": "python -m benchmarks.quality" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
            "started": started, "ended": max(r["finished"] for r in records)[11:16] if a.report_only and records else time.strftime("%H:%M", time.gmtime()), "wall_s": time.time() - t0,
            "workers": workers, "load_start": " ".join(f"{x:.2f}" for x in load0),
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "skipped": skipped, "reused": sum(1 for r in records if r.get("reused_from")), "device": a.device}
    if a.plan:
        print(plans.report(zplan, records, variants, out, meta))
    else:
        print(suite.write_report(plan, records, variants, out, meta))
    print(f"\nwrote {out}/: CSV, JSON, table.txt, summary.md, *.png ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
