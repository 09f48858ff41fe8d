"""The quality suite's plan (which runs), its jobs, and its report (tables, CSV / JSON, plots, summary).

One MQAR run per (variant, task, width, seed) is trained for the most steps any table needs; a table
at fewer steps reads the run's learning curve (exact, see report.at_step). All variants share the
width, depth, heads, optimizer and budget of a cell.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .report import (aggregate, at_step, markdown_table, mean_spread, plot_curves, terminal_table,
                     write_csv_json)

import matplotlib.pyplot as plt  # noqa: E402  (report selects the Agg backend)


@dataclass(frozen=True)
class Plan:
    base: dict                                   # width / depth / heads shared by every variant
    main_task: Tuple[int, int]                   # (num_pairs, seq_len): the main setting
    main_steps: int
    main_seeds: Tuple[int, ...]
    pairs: Tuple[int, Tuple[int, ...]]           # (seq_len, num_pairs values) at width base["dim"]
    seq_lens: Tuple[int, Tuple[int, ...]]        # (num_pairs, seq_len values)
    widths: Tuple[Tuple[int, int], Tuple[int, ...]]   # ((num_pairs, seq_len), dims)
    sweep_steps: int
    sweep_seeds: Tuple[int, ...]
    lm: dict                                     # seq_len, max_bytes, steps, batch_size, eval_every, eval_size
    lm_seeds: Tuple[int, ...]
    vocab: dict = field(default_factory=dict)    # MQARTask num_keys / num_values / num_noise overrides
    eval_every: int = 250


BASE = {"dim": 64, "num_layers": 2, "num_heads": 2, "num_memory_modules": 3}
LM = {"seq_len": 64, "max_bytes": 1_000_000, "steps": 600, "batch_size": 16, "eval_every": 100, "eval_size": 256}
# `python -m benchmarks.quality`: every variant once (seed 0) on the main setting, one short pairs
# sweep and the LM; about 17 minutes on an idle 2-core CPU (2 workers; measured in
# benchmarks/results/quality_cpu-2core_2026-11-26_default).
DEFAULT = Plan(
    base=BASE, main_task=(4, 16), main_steps=3000, main_seeds=(0,),
    pairs=(32, (2, 8)), seq_lens=(4, ()), widths=((8, 32), ()),
    sweep_steps=1000, sweep_seeds=(0,), lm=LM, lm_seeds=(0,),
)
# `--full`: three seeds of the main setting and the LM, and the three sweeps (pairs, length, width)
# long enough for the Transformer's induction phase change; hours on the same machine.
FULL = Plan(
    base=BASE, main_task=(4, 16), main_steps=3000, main_seeds=(0, 1, 2),
    pairs=(32, (2, 4, 8)), seq_lens=(4, (16, 32, 64)), widths=((8, 32), (32, 64, 128)),
    sweep_steps=2000, sweep_seeds=(0,), lm=LM, lm_seeds=(0, 1, 2),
)
QUICK = Plan(
    base={"dim": 32, "num_layers": 2, "num_heads": 2, "num_memory_modules": 3},
    main_task=(1, 8), main_steps=150, main_seeds=(0,),     # one pair, queried at a random slot among noise
    pairs=(8, (1, 2)), seq_lens=(1, (8,)), widths=((1, 8), (16, 32)),
    sweep_steps=50, sweep_seeds=(0,),
    lm={"seq_len": 32, "max_bytes": 60_000, "steps": 20, "batch_size": 8, "eval_every": 10, "eval_size": 16},
    lm_seeds=(0,),
    vocab={"num_keys": 8, "num_values": 8, "num_noise": 4}, eval_every=50,
)


def mqar_cells(plan: Plan) -> Dict[tuple, Tuple[int, Tuple[int, ...]]]:
    """{(num_pairs, seq_len, dim): (steps, seeds)} over the main setting and the three sweeps."""
    dim = plan.base["dim"]
    cells: Dict[tuple, Tuple[int, set]] = {}

    def need(n, t, d, steps, seeds):
        s0, seeds0 = cells.get((n, t, d), (0, set()))
        cells[(n, t, d)] = (max(s0, steps), seeds0 | set(seeds))

    need(*plan.main_task, dim, plan.main_steps, plan.main_seeds)
    for n in plan.pairs[1]:
        need(n, plan.pairs[0], dim, plan.sweep_steps, plan.sweep_seeds)
    for t in plan.seq_lens[1]:
        need(plan.seq_lens[0], t, dim, plan.sweep_steps, plan.sweep_seeds)
    for d in plan.widths[1]:
        need(*plan.widths[0], d, plan.sweep_steps, plan.sweep_seeds)
    return {k: (s, tuple(sorted(seeds))) for k, (s, seeds) in cells.items()}


def jobs(plan: Plan, variants: Sequence[tuple]) -> List[dict]:
    out = []
    for (n, t, d), (steps, seeds) in mqar_cells(plan).items():
        for seed in seeds:
            for name, ov, tasks in variants:
                if "mqar" not in tasks:
                    continue
                out.append({"key": f"mqar|{name}|N={n}|T={t}|dim={d}|steps={steps}|seed={seed}", "task": "mqar",
                            "variant": name, "num_pairs": n, "seq_len": t, "dim": d, "steps": steps, "seed": seed,
                            "task_args": {"num_pairs": n, "seq_len": t, **plan.vocab},
                            "model": {**plan.base, **ov, "dim": d},
                            "budget": {"steps": steps, "eval_every": plan.eval_every}})
    lm = plan.lm
    for seed in plan.lm_seeds:
        for name, ov, tasks in variants:
            if "lm" in tasks:
                out.append({"key": f"lm|{name}|T={lm['seq_len']}|bytes={lm['max_bytes']}|steps={lm['steps']}|seed={seed}",
                            "task": "lm", "variant": name, "dim": plan.base["dim"], "seq_len": lm["seq_len"],
                            "steps": lm["steps"], "seed": seed,
                            "task_args": {"seq_len": lm["seq_len"], "max_bytes": lm["max_bytes"]},
                            "model": {**plan.base, **ov},
                            "budget": {k: lm[k] for k in ("steps", "batch_size", "eval_every", "eval_size")}})
    # longest first: two workers finish together
    return sorted(out, key=lambda j: -j["steps"] * j["seq_len"] * j["dim"])


# ---------------------------------------------------------------------- report
def _select(records, steps: int, **where) -> List[dict]:
    return [at_step(r, steps) for r in records
            if all(r.get(k) == v for k, v in where.items()) and r["steps"] >= steps]


def _cell(rows: List[dict], variant: str) -> str:
    r = next((r for r in rows if r["variant"] == variant), None)
    if r is None:
        return "-"
    return f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["n"] > 1 else "")


def tables(plan: Plan, records: List[dict], variants: Sequence[tuple]) -> Tuple[str, str, List[dict]]:
    """(terminal table, markdown tables, summary rows)."""
    names = [v[0] for v in variants]
    mq = [r for r in records if r["task"] == "mqar"]
    lm = [r for r in records if r["task"] == "lm"]
    dim = plan.base["dim"]
    cols: List[Tuple[str, List[dict]]] = []        # (header, aggregated rows per variant)
    n, t = plan.main_task
    cols.append((f"MQAR N={n} T={t} ({plan.main_steps} st)",
                 aggregate(_select(mq, plan.main_steps, num_pairs=n, seq_len=t, dim=dim), ["variant"], "accuracy")))
    sweep = []
    T = plan.pairs[0]
    sweep += [(n, T, dim) for n in plan.pairs[1]]
    N = plan.seq_lens[0]
    sweep += [(N, t, dim) for t in plan.seq_lens[1] if (N, t, dim) not in sweep]
    (wn, wt), dims = plan.widths
    sweep += [(wn, wt, d) for d in dims if (wn, wt, d) not in sweep]
    for n, t, d in sweep:
        cols.append((f"N={n} T={t} d={d}",
                     aggregate(_select(mq, plan.sweep_steps, num_pairs=n, seq_len=t, dim=d), ["variant"], "accuracy")))
    lm_rows = aggregate(lm, ["variant"], "bpb")
    summary = []
    for name in names:
        p_mq = next((r["params"] for r in mq if r["variant"] == name and r["dim"] == dim), None)
        p_lm = next((r["params"] for r in lm if r["variant"] == name), None)
        row = {"variant": name, "params_mqar": p_mq, "params_lm": p_lm}
        for h, rows in cols:
            row[h] = _cell(rows, name)
        row["LM bits/byte"] = _cell(lm_rows, name)
        summary.append(row)
    headers = ["variant", "params (MQAR d=%d / LM)" % dim] + [h for h, _ in cols] + \
        [f"LM bits/byte ({plan.lm['steps']} st)"]
    fmt_p = lambda r: "/".join("-" if p is None else f"{p / 1e3:.0f}k" for p in (r["params_mqar"], r["params_lm"]))
    columns = [(headers[0], lambda r: r["variant"]), (headers[1], fmt_p)] + \
        [(h, (lambda h: lambda r: r[h])(h)) for h, _ in cols] + [(headers[-1], lambda r: r["LM bits/byte"])]
    term = terminal_table(summary, columns)
    md = markdown_table(summary, columns)
    # the long form: every cell with spread and seeds
    long_rows = []
    for h, rows in cols + [(headers[-1], lm_rows)]:
        for r in rows:
            long_rows.append({"setting": h, **r})
    md_long = markdown_table(long_rows, [
        ("setting", lambda r: r["setting"]), ("variant", lambda r: r["variant"]),
        ("params", lambda r: f"{r['params']:,}"), ("mean ± std [min, max]", mean_spread),
        ("per seed", lambda r: ", ".join(f"{v:.3f}" for v in r["values"])),
        ("seeds", lambda r: ",".join(map(str, r["seeds"]))), ("wall s/run", lambda r: f"{r['wall_s']:.0f}")])
    return term, md + "\n\nEvery cell (mean ± sample std over seeds, [min, max]):\n\n" + md_long, summary


def plots(plan: Plan, records: List[dict], variants: Sequence[tuple], out: Path) -> List[str]:
    names = [v[0] for v in variants]
    mq = [r for r in records if r["task"] == "mqar"]
    dim = plan.base["dim"]
    panels = [
        ("number of key-value pairs N", f"T={plan.pairs[0]}, d={dim}", plan.pairs[1],
         lambda x: dict(num_pairs=x, seq_len=plan.pairs[0], dim=dim)),
        ("sequence length T", f"N={plan.seq_lens[0]}, d={dim}", plan.seq_lens[1],
         lambda x: dict(num_pairs=plan.seq_lens[0], seq_len=x, dim=dim)),
        ("model width d", f"N={plan.widths[0][0]}, T={plan.widths[0][1]}", plan.widths[1],
         lambda x: dict(num_pairs=plan.widths[0][0], seq_len=plan.widths[0][1], dim=x)),
    ]
    panels = [pn for pn in panels if pn[2]]
    pngs = ["mqar_curves.png", "lm_curves.png"]
    if panels:      # no sweep asked for (--pairs "" and no other sweep): no sweep figure
        _plot_sweeps(panels, mq, names, plan.sweep_steps, out / "mqar_accuracy.png")
        pngs.insert(0, "mqar_accuracy.png")
    n, t = plan.main_task
    main = {name: _select(mq, plan.main_steps, variant=name, num_pairs=n, seq_len=t, dim=dim) for name in names}
    plot_curves({k: v for k, v in main.items() if v}, "accuracy", "MQAR accuracy",
                f"MQAR N={n}, T={t}, d={dim}: mean and min-max over seeds", out / "mqar_curves.png")
    lm = {name: [r for r in records if r["task"] == "lm" and r["variant"] == name] for name in names}
    plot_curves({k: v for k, v in lm.items() if v}, "bpb", "validation bits/byte",
                f"byte-level LM (stdlib corpus), d={dim}: mean and min-max over seeds", out / "lm_curves.png")
    return pngs


def _plot_sweeps(panels, mq: List[dict], names: Sequence[str], sweep_steps: int, path: Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    for ax, (xlabel, title, xs, where) in zip(axes, panels):
        for name in names:
            pts = [(x, r["accuracy"]) for x in xs for r in _select(mq, sweep_steps, variant=name, **where(x))]
            if not pts:
                continue
            means = [(x, sum(a for xx, a in pts if xx == x) / sum(1 for xx, _ in pts if xx == x))
                     for x in xs if any(xx == x for xx, _ in pts)]
            line, = ax.plot([m[0] for m in means], [m[1] for m in means], marker="o", label=name)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), s=8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MQAR accuracy")
        ax.set_title(f"{title}, {sweep_steps} steps", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FIELDS = ["task", "variant", "num_pairs", "seq_len", "dim", "steps", "seed", "accuracy", "bpb", "params",
          "params_non_embedding", "wall_s", "load_start", "load_end", "finished", "accuracy_by_pair"]


def write_report(plan: Plan, records: List[dict], variants: Sequence[tuple], out: Path, meta: dict) -> str:
    term, md, _ = tables(plan, records, variants)
    write_csv_json(records, out / "quality", FIELDS)
    pngs = plots(plan, records, variants, out)
    lines = [
        "# Quality suite: MQAR and byte-level LM",
        "",
        f"Command: `{meta['command']}` | {meta['started']} .. {meta['ended']} UTC | wall {meta['wall_s']:.0f} s | "
        f"{meta['workers']} worker process(es), 1 thread each | load average (uptime) at start "
        f"{meta['load_start']}, at end {meta['load_end']} | {meta['machine']} | torch {meta['torch']}",
        "",
        f"Models: {plan.base['num_layers']} layers, dim {plan.base['dim']} (width sweep aside), "
        f"{plan.base['num_heads']} heads, torch backend. Training: AdamW lr 1e-3 constant (torch defaults), "
        f"batch 64 for MQAR, {plan.lm['batch_size']} x {plan.lm['seq_len']} bytes for the LM; the same for every "
        f"variant. MQAR accuracy on 1,024 held-out sequences (chance 1/64); main setting {plan.main_steps} steps, "
        f"sweeps {plan.sweep_steps} steps; LM bits/byte on the validation split after {plan.lm['steps']} steps.",
        "",
        md,
        "",
        *[f"![{p}]({p})" for p in pngs],
    ]
    if meta.get("reused"):
        lines += ["", f"{meta['reused']} of {len(records)} runs were copied from identical earlier runs "
                      "(--reuse; same config, task, budget and seed: training is deterministic); their "
                      "wall times are those of the original runs."]
    if meta.get("skipped"):
        lines += ["", "Skipped (this HOPEConfig does not accept them yet): " + ", ".join(meta["skipped"])]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "table.txt").write_text(term + "\n")
    return term
