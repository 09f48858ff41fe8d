"""`--plan zoology*` (Zoology's MQAR grid with a learning-rate sweep) and `--plan niah*` (needle
retrieval past the training length): their plans, jobs and reports.

Zoology grid (Arora et al. 2023, Figure 2; `iclr24_zoology_figure2/configs.py`): vocab 8,192,
(T, N) = (64, 4), (128, 8), (256, 16), 2 layers, learning rates logspace(-4, -2, 4) = 1e-4, 4.6e-4,
2.2e-3, 1e-2, the best learning rate per (variant, T, N, d_model) cell reported. Here: d_model 64 and
128 (theirs 64..512), one head (as their attention), our blocks with their MLP (theirs: no MLP in
the attention baseline), rotary positions (theirs: learned), AdamW at a constant rate, fresh batches
(benchmarks/quality/mqar.py, ZoologyMQAR, lists the data differences).

`zoology` (GPU, `--device cuda`): 3 cells x 2 widths x 4 rates x 8 variants = 192 runs of 1,000
steps at batch 64, 12 processes sharing the GPU, the Triton kernels (backend None) with their default
configs (HOPE_KERNELS_AUTOTUNE=0: no per-process autotuning). Estimate for one H100, two bounds:
- arithmetic: 6 x (non-embedding params, ~0.1M at d 64 / ~0.4M at d 128) x tokens (64 x T, mean
  T 149) per step, plus the tied 8,192-way output layer on the answer positions only
  (train.answer_forward): ~3e15 FLOPs over the 192,000 steps, under a minute even at 50 TFLOP/s;
- launches: such small models are launch-bound; ~300 kernels per step (2 blocks forward, backward
  and AdamW) at ~5 us is ~1.5-2 ms of GPU time per step, 192,000 steps x 2 ms = 6.4 minutes if
  the 12 processes' kernels never overlap, with their host-side Python in parallel on 16 cores.
Plus start-up and the held-out evaluations (4 x 1,024 sequences per run, forward only): about 7-8
minutes. An estimate, not yet measured on a GPU; if it runs long, the grid resumes from runs.jsonl.

`zoology-cpu`: (T, N) = (64, 4) and (128, 8) at d 64, rates 4.6e-4 / 2.2e-3 / 1e-2, 400 steps at batch
32; `zoology-toy`: one tiny cell, two rates, seconds (the pipeline check of gpu_suite.sh DRY=1).

Needle plans: NeedleTask (benchmarks/quality/niah.py), single needle and 4 needles with one asked,
trained at T_train, evaluated at T_train, 4 T_train and 16 T_train.
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .report import markdown_table, terminal_table, write_csv_json

import matplotlib.pyplot as plt  # noqa: E402  (report selects the Agg backend)

ZOOLOGY_LRS = (1e-4, 4.641588833612782e-4, 2.1544346900318843e-3, 1e-2)   # numpy.logspace(-4, -2, 4)


@dataclass(frozen=True)
class ZooPlan:
    cells: Tuple[Tuple[int, int], ...]      # (seq_len, num_pairs)
    dims: Tuple[int, ...]
    lrs: Tuple[float, ...]
    steps: int
    batch_size: int
    base: dict
    vocab: int = 8192
    eval_every: int = 500
    eval_size: int = 1024
    seeds: Tuple[int, ...] = (0,)


@dataclass(frozen=True)
class NeedlePlan:
    train_len: int
    factors: Tuple[int, ...]                # evaluation lengths: factor x train_len
    needles: Tuple[int, ...]                # needles per sequence (one asked)
    steps: int
    batch_size: int
    lr: float
    base: dict
    task: dict                              # NeedleTask vocabulary overrides
    eval_every: int = 250
    eval_size: int = 512
    seeds: Tuple[int, ...] = (0,)


ZOO_BASE = {"num_layers": 2, "num_heads": 1, "num_memory_modules": 3}
PLANS = {
    "zoology": ZooPlan(cells=((64, 4), (128, 8), (256, 16)), dims=(64, 128), lrs=ZOOLOGY_LRS, steps=1000,
                       batch_size=64, base=ZOO_BASE),
    "zoology-cpu": ZooPlan(cells=((64, 4), (128, 8)), dims=(64,), lrs=ZOOLOGY_LRS[1:], steps=400,
                           batch_size=32, base=ZOO_BASE, eval_every=100, eval_size=512),
    "zoology-toy": ZooPlan(cells=((16, 2),), dims=(16,), lrs=(1e-3, 1e-2), steps=6, batch_size=8,
                           base=ZOO_BASE, vocab=64, eval_every=3, eval_size=16),
    "niah": NeedlePlan(train_len=32, factors=(1, 4, 16), needles=(1, 4), steps=800, batch_size=64, lr=2e-3,
                       base={"dim": 64, "num_layers": 2, "num_heads": 2, "num_memory_modules": 3}, task={}),
    "niah-toy": NeedlePlan(train_len=8, factors=(1, 4), needles=(1, 2), steps=6, batch_size=8, lr=1e-3,
                           base={"dim": 16, "num_layers": 1, "num_heads": 2, "num_memory_modules": 3},
                           task={"num_keys": 4, "num_values": 4, "num_filler": 4}, eval_every=3, eval_size=16),
}


def jobs(plan, variants: Sequence[tuple], device: str = "cpu") -> List[dict]:
    out = []
    backend = {} if device == "cpu" else {"backend": None}      # CPU: the torch backend (runner.model_config)
    recall_variants = [v for v in variants if "mqar" in v[2]]
    if isinstance(plan, ZooPlan):
        for (T, N), d, lr, seed, (name, ov, _) in itertools.product(plan.cells, plan.dims, plan.lrs, plan.seeds,
                                                                    recall_variants):
            out.append({
                "key": f"zoology|{name}|T={T}|N={N}|dim={d}|lr={lr:.3g}|steps={plan.steps}|"
                       f"B={plan.batch_size}|V={plan.vocab}|seed={seed}",
                "task": "zoology", "variant": name, "num_pairs": N, "seq_len": T, "dim": d,
                "lr": lr, "steps": plan.steps, "seed": seed, "device": device,
                "task_args": {"num_pairs": N, "seq_len": T, "vocab": plan.vocab},
                "model": {**plan.base, **ov, "dim": d, **backend},
                "budget": {"steps": plan.steps, "batch_size": plan.batch_size, "lr": lr,
                           "eval_every": plan.eval_every, "eval_size": plan.eval_size}})
    else:
        lengths = [f * plan.train_len for f in plan.factors]
        for n, seed, (name, ov, _) in itertools.product(plan.needles, plan.seeds, recall_variants):
            out.append({
                "key": f"niah|{name}|needles={n}|T={plan.train_len}|eval={','.join(map(str, lengths))}|"
                       f"steps={plan.steps}|lr={plan.lr:.3g}|seed={seed}",
                "task": "niah", "variant": name, "num_needles": n, "seq_len": plan.train_len,
                "dim": plan.base["dim"], "lr": plan.lr, "steps": plan.steps, "seed": seed,
                "device": device, "eval_lengths": lengths,
                "task_args": {"seq_len": plan.train_len, "num_needles": n, **plan.task},
                "model": {**plan.base, **ov, **backend},
                "budget": {"steps": plan.steps, "batch_size": plan.batch_size, "lr": plan.lr,
                           "eval_every": plan.eval_every, "eval_size": plan.eval_size}})
    # smallest cells first: an interrupted run has whole cells (every variant and rate) to report
    return sorted(out, key=lambda j: (j["steps"] * j["seq_len"] * j["dim"], j.get("num_needles", 0)))


# ---------------------------------------------------------------------- Zoology report
def best_per_cell(records: Sequence[dict]) -> List[dict]:
    """One row per (variant, seq_len, num_pairs, dim): the record of the learning rate with the best
    final accuracy (mean over seeds), with every rate's accuracy in "by_lr"."""
    groups: Dict[tuple, Dict[float, List[float]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["seq_len"], r["num_pairs"], r["dim"]), {}).setdefault(r["lr"], []).append(
            r["accuracy"])
    rows = []
    for (v, T, N, d), by_lr in groups.items():
        means = {lr: sum(a) / len(a) for lr, a in by_lr.items()}
        lr = max(means, key=means.get)
        rows.append({"variant": v, "seq_len": T, "num_pairs": N, "dim": d, "best_lr": lr, "accuracy": means[lr],
                     "by_lr": dict(sorted(means.items()))})
    return rows


def zoology_report(plan: ZooPlan, records: List[dict], variants: Sequence[tuple], out: Path, meta: dict) -> str:
    best = best_per_cell(records)
    names = [v[0] for v in variants]
    cols = [(T, N, d) for T, N in plan.cells for d in plan.dims]
    cell = {(r["variant"], r["seq_len"], r["num_pairs"], r["dim"]): r for r in best}

    def fmt(name, c):
        r = cell.get((name, *c))
        return "-" if r is None else f"{r['accuracy']:.3f} ({r['best_lr']:.1e})"

    columns = [("variant", lambda n: n)] + [(f"T={T} N={N} d={d}", (lambda c: lambda n: fmt(n, c))((T, N, d)))
                                            for T, N, d in cols]
    rows = [n for n in names if any((n, *c) in cell for c in cols)]
    term, md = terminal_table(rows, columns), markdown_table(rows, columns)
    lrs_md = markdown_table(best, [
        ("variant", lambda r: r["variant"]), ("T", lambda r: str(r["seq_len"])), ("N", lambda r: str(r["num_pairs"])),
        ("d", lambda r: str(r["dim"])),
        *[(f"lr {lr:.1e}", (lambda lr: lambda r: f"{r['by_lr'][lr]:.3f}" if lr in r["by_lr"] else "-")(lr))
          for lr in plan.lrs]])
    write_csv_json(records, out / "zoology", ["variant", "seq_len", "num_pairs", "dim", "lr", "steps", "seed",
                                              "accuracy", "params", "wall_s", "load_start", "load_end", "finished"])
    write_csv_json(best, out / "zoology_best", ["variant", "seq_len", "num_pairs", "dim", "best_lr", "accuracy"])
    fig, axes = plt.subplots(1, len(plan.dims), figsize=(5 * len(plan.dims), 4), squeeze=False)
    for ax, d in zip(axes[0], plan.dims):
        for n in rows:
            pts = [(T, cell[(n, T, N, d)]["accuracy"]) for T, N in plan.cells if (n, T, N, d) in cell]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_xticks([T for T, _ in plan.cells])
        ax.set_xticklabels([f"{T}\n(N={N})" for T, N in plan.cells])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length T (key-value pairs N)")
        ax.set_ylabel("MQAR accuracy, best learning rate")
        ax.set_title(f"d_model {d}, {plan.steps} steps x batch {plan.batch_size}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "zoology_mqar.png", dpi=120)
    plt.close(fig)
    lines = [
        "# MQAR on the Zoology grid", "",
        _meta_line(meta), "",
        f"Task: ZoologyMQAR (vocab {plan.vocab}, power-law query gaps a = 0.01, blanks 0), "
        f"{plan.base['num_layers']} layers, {plan.base['num_heads']} head, AdamW constant learning rate, "
        f"{plan.steps} steps x batch {plan.batch_size}, held-out accuracy on {plan.eval_size} sequences. "
        "Cell: accuracy at the best learning rate (that rate).", "",
        md, "", "Every learning rate:", "", lrs_md, "", "![zoology_mqar.png](zoology_mqar.png)",
    ]
    if meta.get("skipped"):
        lines += ["", "Skipped (this HOPEConfig does not accept them): " + ", ".join(meta["skipped"])]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "table.txt").write_text(term + "\n")
    return term


# ---------------------------------------------------------------------- needle report
def needle_report(plan: NeedlePlan, records: List[dict], variants: Sequence[tuple], out: Path, meta: dict) -> str:
    names = [v[0] for v in variants]
    lengths = [f * plan.train_len for f in plan.factors]
    rec = {(r["variant"], r["num_needles"]): r for r in records}
    columns = [("variant", lambda n: n)] + [
        (f"{k} needle{'s' if k > 1 else ''} @ T={L}",
         (lambda k, L: lambda n: f"{rec[(n, k)]['accuracy_by_length'][str(L)]:.3f}" if (n, k) in rec else "-")(k, L))
        for k in plan.needles for L in lengths]
    rows = [n for n in names if any((n, k) in rec for k in plan.needles)]
    term, md = terminal_table(rows, columns), markdown_table(rows, columns)
    write_csv_json(records, out / "needle", ["variant", "num_needles", "seq_len", "eval_lengths", "steps", "lr",
                                             "seed", "accuracy", "accuracy_by_length", "accuracy_by_depth",
                                             "params", "wall_s", "load_start", "load_end", "finished"])
    fig, axes = plt.subplots(len(plan.needles), 2, figsize=(11, 3.8 * len(plan.needles)), squeeze=False)
    bins = [(i + 0.5) / 5 for i in range(5)]
    for (ax_len, ax_depth), k in zip(axes, plan.needles):
        for n in rows:
            r = rec.get((n, k))
            if r is None:
                continue
            line, = ax_len.plot(lengths, [r["accuracy_by_length"][str(L)] for L in lengths], marker="o", label=n)
            for L, ls in zip(lengths, ("-", "--", ":", "-.")):
                acc = r["accuracy_by_depth"][str(L)]
                ax_depth.plot([b for b, a in zip(bins, acc) if a is not None], [a for a in acc if a is not None],
                              ls=ls, marker=".", color=line.get_color())
        ax_len.axvline(plan.train_len, color="gray", lw=0.8)
        ax_len.set_xscale("log", base=2)
        ax_len.set_xticks(lengths)
        ax_len.set_xticklabels([str(L) for L in lengths])
        ax_len.set_ylim(-0.02, 1.02)
        ax_len.set_xlabel("evaluation length (training length marked)")
        ax_len.set_ylabel("needle accuracy")
        ax_len.set_title(f"{k} needle{'s' if k > 1 else ''} (one asked), trained at T={plan.train_len}", fontsize=10)
        ax_len.grid(alpha=0.3)
        ax_depth.set_ylim(-0.02, 1.02)
        ax_depth.set_xlabel("needle depth (position / length)")
        ax_depth.set_ylabel("needle accuracy")
        ax_depth.set_title("by depth: " + ", ".join(f"{ls} T={L}" for L, ls in zip(lengths, ("-", "--", ":", "-."))),
                           fontsize=9)
        ax_depth.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "needle.png", dpi=120)
    plt.close(fig)
    depth_rows = [{"variant": r["variant"], "k": r["num_needles"], "L": L, "acc": r["accuracy_by_depth"][str(L)]}
                  for r in records for L in lengths]
    depth_md = markdown_table(depth_rows, [
        ("variant", lambda r: r["variant"]), ("needles", lambda r: str(r["k"])), ("length", lambda r: str(r["L"])),
        *[(f"depth {i / 5:.1f}-{(i + 1) / 5:.1f}",
           (lambda i: lambda r: "-" if r["acc"][i] is None else f"{r['acc'][i]:.2f}")(i)) for i in range(5)]])
    task = {"num_keys": 32, "num_values": 32, "num_filler": 64, **plan.task}
    lines = [
        "# Needle retrieval past the training length", "",
        _meta_line(meta), "",
        f"Task: NeedleTask ({task['num_keys']} keys, {task['num_values']} values, {task['num_filler']} filler "
        f"tokens; chance {1 / task['num_values']:.3f}), trained at T={plan.train_len} for {plan.steps} steps x batch "
        f"{plan.batch_size} at lr {plan.lr:g} (AdamW, constant), evaluated unchanged on {plan.eval_size} held-out "
        f"sequences per length. Model: {plan.base['num_layers']} layers, dim {plan.base['dim']}, "
        f"{plan.base['num_heads']} heads, rotary positions for softmax attention.", "",
        md, "", "By needle depth:", "", depth_md, "", "![needle.png](needle.png)",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "table.txt").write_text(term + "\n")
    return term


def _meta_line(meta: dict) -> str:
    return (f"Command: `{meta['command']}` | {meta['started']} .. {meta['ended']} UTC | wall {meta['wall_s']:.0f} s | "
            f"{meta['workers']} worker process(es), 1 thread each | load average at start {meta['load_start']}, "
            f"at end {meta['load_end']} | {meta['machine']} | torch {meta['torch']} | device {meta['device']}")


def report(plan, records, variants, out, meta) -> str:
    return (zoology_report if isinstance(plan, ZooPlan) else needle_report)(plan, records, variants, out, meta)
