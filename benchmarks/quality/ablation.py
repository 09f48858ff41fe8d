"""The ablations (docs/findings.md), one command each:

    python -m benchmarks.quality.ablation [--design cms] [--seeds 0,1,2] [--workers 2] [--out DIR]
    python -m benchmarks.quality.ablation --design paper-recall [--seeds 0,1,2] [--workers 2] [--out DIR]

--design paper-recall: why the paper's HOPE (self-modifying Titans -> CMS levels, variant "paper HOPE")
does not recall on MQAR, and what makes it recall (results in
benchmarks/results/quality_cpu-2core_2026-12-02_paper-hope-recall/). MQAR with 4 pairs at 64 tokens
(1,000 steps; every run is also read at 500 steps off its curve) and at 16 tokens (3,000 steps), the
CMS ablation's model size and recipe; each cell
changes one thing of the paper HOPE (RECALL_CELLS): the Titans period, momentum, the self-modifying
parts one at a time (benchmarks/quality/designs.py, apply_selfmod: M_k / M_v initialisation, static
k / v projections, M_mem written toward v instead of vhat), M_mem at its own period 1
(`titans_mem_period=1`), the levels, lr_max, the learning rate and
the training length; then the combinations that recall.

--design cms (the default): why the seed's decaying CMS kept a softmax-attention HOPE block from
solving MQAR, and what the block's default CMS changed (results in
benchmarks/results/quality_cpu-2core_2026-11-26_cms-ablation/).

Setting: MQAR with 4 pairs, 16 tokens (every key queried once), 2 layers, dim 64, 2 heads, M=3
timescales, AdamW lr 1e-3 constant, batch 64, 3,000 steps, torch backend. Each cell changes one
thing of the old seed HOPE block (x += attn; x += cms; x += mlp; the seed's "outer" write
S = tau S + (1 - tau) k^T v; no short convolution in the CMS, cms_conv_size=1; read-out W_o o), of the
"conv" block (the CMS's q, k, v pass a short causal convolution) or adds the gated read-out
W_o (rmsnorm(o) * silu(x W_g)) and then the delta-rule write (the default, see hope/cms.py). The
Transformer, the default and Hope-attention (whose CMS levels read their block-start weights, Eq. 71,
hope/levels.py) are the variants of benchmarks/variants.py. Block designs that hope/block.py does not
offer come from benchmarks/quality/designs.py (`apply_design`): the CMS placement, a learned gate on
its output, a per-head RMSNorm of its read-out, and which layers keep a CMS; `lr_scale` scales the
CMS's learning rate (0 freezes it at its random initialisation). Cells marked (c9e3a77) ran at that
commit, whose CMS convolution was an nn.Conv1d with the same initial weights as today's ShortConv.
Writes runs.jsonl (resumable), ablation.csv / .json, ablation.md and two plots into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from ..variants import variant
from .report import aggregate, at_step, markdown_table, mean_spread, plot_curves, plot_points, terminal_table, write_csv_json
from .designs import build_model
from .mqar import MQARTask
from .runner import model_config, run_all

# (name, model overrides, design, lr_scale, steps); None = the defaults below.
SEED_HOPE = {"num_memory_modules": 3}
# The lr is constant, so a run's curve at step 3,000 is what a 3,000-step run reports: the seed HOPE
# cell runs 9,000 steps at the LONG_SEEDS and its table shows both (training length).
LONG, LONG_SEEDS = 9000, (0,)
# the CMS design fields (designs.CMS_DESIGN_FIELDS) rebuild the earlier CMS layers
OUTER = {"cms_update": "outer"}                                  # the seed's write rule (cms_scan)
OLD = {**OUTER, "cms_conv_size": 1, "cms_gated_readout": False}   # the seed HOPE block before the CMS fix
CONV = {**OUTER, "cms_gated_readout": False}                      # + the short causal conv
MAIN_SEEDS = (0, 1, 2)              # the MAIN cells run these seeds too; the others run --seeds only
CELLS = [
    ("Transformer (no CMS)", variant("Transformer").overrides, None, None, None),
    ("old seed HOPE: serial", OLD, None, None, LONG),
    ("conv: short causal conv in the CMS", CONV, None, None, None),
    ("conv + gated read-out", OUTER, None, None, None),
    ("new default: conv + gated read-out + delta-rule update", variant("seed HOPE").overrides, None, None, None),
    ("Hope-attention: levels read block-start weights (Eq. 71)", variant("Hope-attention").overrides, None,
     None, None),
    ("gated read-out without the conv", {**OUTER, "cms_conv_size": 1}, None, None, None),
    ("delta-rule update without the conv", {"cms_conv_size": 1}, None, None, None),
    ("old + CMS in layer 2 only", OLD, {"cms_layers": [1]}, None, None),
    ("old + placement parallel to attention", OLD, {"placement": "parallel"}, None, None),
    ("old + placement after the MLP", OLD, {"placement": "after_mlp"}, None, None),
    ("old + gate: scalar, init 0", OLD, {"gate": "scalar"}, None, None),
    ("old + CMS lr x0.1", OLD, None, {".cms.": 0.1}, None),
    ("old + norm: per-head RMSNorm of the read-out", OLD, {"out_norm": True}, None, None),
    ("old + CMS in layer 1 only", OLD, {"cms_layers": [0]}, None, None),
    ("old + CMS frozen at init (lr 0)", OLD, None, {".cms.": 0.0}, None),
    ("conv + placement before attention (c9e3a77)", CONV, {"placement": "before_attn"}, None, None),
    ("conv + placement after the MLP (c9e3a77)", CONV, {"placement": "after_mlp"}, None, None),
    ("conv + shift-initialised conv (H3) (c9e3a77)", CONV, {"shift_init": True}, None, None),
    ("conv + CMS lr x0.1 (c9e3a77)", CONV, None, {".cms.": 0.1}, None),
]
MAIN = [c[0] for c in CELLS[:6]]
BASE = {"dim": 64, "num_layers": 2, "num_heads": 2}
TASK = {"num_pairs": 4, "seq_len": 16}
STEPS = 3000


def jobs(seeds: Sequence[int], cells=CELLS, steps: int = STEPS, eval_every: int = 250, extra_seeds=MAIN_SEEDS):
    """Every cell at `seeds`; the MAIN cells also at extra_seeds."""
    out = []
    for seed in sorted(set(seeds) | set(extra_seeds)):   # seed-major: a cut-short run has every cell at seed 0
        for name, model, design, lr_scale, n in cells:
            if seed not in seeds and name not in MAIN:
                continue
            n = n if n and seed in LONG_SEEDS else steps
            key = f"ablation|{name}|steps={n}|seed={seed}"
            out.append({"key": key, "cell": name, "task": "mqar", "task_args": TASK,
                        "model": {**BASE, **SEED_HOPE, **model}, "design": design, "lr_scale": lr_scale,
                        "budget": {"steps": n, "eval_every": eval_every}, "seed": seed, "steps": n})
    return out


COLUMNS = [
    ("cell", lambda r: r["cell"]),
    ("steps", lambda r: f"{r['steps']:,}"),
    ("params", lambda r: f"{r['params'] / 1e3:.0f}k"),
    ("MQAR accuracy: mean ± std [min, max]", mean_spread),
    ("per seed", lambda r: ", ".join(f"{v:.2f}" for v in r["values"])),
    ("seeds", lambda r: ",".join(map(str, r["seeds"]))),
    ("wall s/run", lambda r: f"{r['wall_s']:.0f}"),
]


def _plot_longest_curves(records, out: Path) -> None:
    """ablation_curves.png: each cell's learning curves at its longest training run (band over seeds)."""
    longest = {}
    for r in records:
        longest[r["cell"]] = max(longest.get(r["cell"], 0), r["steps"])
    by = {}
    for r in records:
        if r["steps"] == longest[r["cell"]]:
            by.setdefault(r["cell"], []).append(r)
    plot_curves(by, "accuracy", "MQAR accuracy", "Learning curves (mean, band: min-max over seeds)",
                out / "ablation_curves.png")


def report(records, out: Path, header: str) -> str:
    records = [at_step(r, STEPS) for r in records if r["steps"] > STEPS] + list(records)
    records.sort(key=lambda r: ([c[0] for c in CELLS].index(r["cell"]) if r["cell"] in [c[0] for c in CELLS]
                                else len(CELLS), r["steps"], r["seed"]))
    rows = aggregate(records, ["cell", "steps"], "accuracy")
    md = markdown_table(rows, COLUMNS)
    (out / "ablation.md").write_text(header + "\n\n" + md + "\n")
    write_csv_json(records, out / "ablation", ["cell", "steps", "seed", "accuracy", "params", "wall_s",
                                               "load_start", "load_end", "finished", "design", "lr_scale"])
    plot_points(rows, lambda r: r["cell"] + ("" if r["steps"] == STEPS else f" ({r['steps']:,} steps)"), "MQAR accuracy (held-out)",
                "CMS ablation: MQAR 4 pairs, 16 tokens, 2 layers, dim 64 (dots: seeds)", out / "ablation.png",
                hline=1.0)
    _plot_longest_curves(records, out)
    return terminal_table(rows, COLUMNS)


# ---------------------------------------------------------------------- paper HOPE recall
PAPER = {**BASE, **variant("paper HOPE").overrides}
T64, T16 = {"num_pairs": 4, "seq_len": 64}, {"num_pairs": 4, "seq_len": 16}
RECALL_STEPS = {64: 1000, 16: 3000}
ORTHO = {"init": "orthogonal"}
ONLINE = {"titans_mem_period": 1}     # M_mem at its own period 1 (hope/selfmod.py)
# (name, task, model overrides, apply_selfmod design, budget overrides); steps default RECALL_STEPS
RECALL_CELLS = [
    ("paper HOPE (period 16)", T64, {}, None, {}),
    ("period 8", T64, {"titans_period": 8}, None, {}),
    ("period 4", T64, {"titans_period": 4}, None, {}),
    ("period 1 (exact DGD)", T64, {"titans_period": 1}, None, {}),
    ("momentum", T64, {"titans_momentum": True}, None, {}),
    ("M_k, M_v random orthogonal at init", T64, {}, ORTHO, {}),
    ("static learned k, v projections", T64, {}, {"kv": "static"}, {}),
    ("M_mem written toward v (not vhat)", T64, {}, {"values": "v"}, {}),
    ("levels off (self-modifying Titans -> MLP)", T64, {"cms": "none"}, None, {}),
    ("lr_max 1.9", T64, {"titans_lr_max": 1.9}, None, {}),
    ("AdamW lr 3e-3", T64, {}, None, {"lr": 3e-3}),
    ("3,000 steps", T64, {}, None, {"steps": 3000}),
    ("orthogonal + period 4", T64, {"titans_period": 4}, ORTHO, {}),
    ("orthogonal + period 1", T64, {"titans_period": 1}, ORTHO, {}),
    ("orthogonal + period 1 + static k, v + M_mem toward v", T64, {"titans_period": 1},
     {**ORTHO, "kv": "static", "values": "v"}, {}),
    ("orthogonal + M_mem at period 1, projections at 16", T64, ONLINE, ORTHO, {}),
    ("orthogonal + M_mem at period 1, one head (D = 64)", T64, {**ONLINE, "num_heads": 1}, ORTHO, {}),
    ("orthogonal + M_mem at period 1, one head, AdamW lr 3e-3", T64, {**ONLINE, "num_heads": 1}, ORTHO,
     {"lr": 3e-3}),
    ("orthogonal + M_mem at period 1, AdamW lr 3e-3", T64, ONLINE, ORTHO, {"lr": 3e-3}),
    ("orthogonal, AdamW lr 3e-3", T64, {}, ORTHO, {"lr": 3e-3}),
    ("orthogonal + M_mem at period 1, AdamW lr 3e-3, 2,000 steps", T64, ONLINE, ORTHO,
     {"lr": 3e-3, "steps": 2000}),
    ("orthogonal + M_mem at period 1, AdamW lr 3e-3, 4 heads (hope_paper_recall_tiny's)", T64,
     {**ONLINE, "num_heads": 4}, ORTHO, {"lr": 3e-3}),
    ("control: Titans period 1 (not self-modifying, no levels)", T64,
     {**variant("Titans period 1 (DGD)").overrides, "self_modifying": False}, None, {}),
    ("paper HOPE (period 16), 16 tokens", T16, {}, None, {}),
    ("orthogonal + period 1, 16 tokens", T16, {"titans_period": 1}, ORTHO, {}),
]
RECALL_MAIN = ["paper HOPE (period 16)", "orthogonal + period 1", "paper HOPE (period 16), 16 tokens",
               "orthogonal + period 1, 16 tokens", "orthogonal + M_mem at period 1, AdamW lr 3e-3, 2,000 steps"]


def recall_jobs(seeds: Sequence[int], cells=RECALL_CELLS, eval_every: int = 250, extra_seeds=MAIN_SEEDS):
    """Every cell at `seeds`; the RECALL_MAIN cells also at extra_seeds."""
    out = []
    for seed in sorted(set(seeds) | set(extra_seeds)):
        for name, task, model, design, budget in cells:
            if seed not in seeds and name not in RECALL_MAIN:
                continue
            budget = {"steps": RECALL_STEPS[task["seq_len"]], "eval_every": eval_every, **budget}
            key = f"paper-recall|{name}|T={task['seq_len']}|steps={budget['steps']}|seed={seed}"
            out.append({"key": key, "cell": name, "task": "mqar", "task_args": task, "model": {**PAPER, **model},
                        "design": None if design is None else {"selfmod": design}, "lr_scale": None,
                        "budget": budget, "seed": seed, "steps": budget["steps"], "seq_len": task["seq_len"]})
    return out


@torch.no_grad()
def write_share(model, tokens) -> float:
    """How much of the first self-modifying Titans layer's read o_t = q_t M_t comes from the sequence's
    writes: ||o - o_0|| / ||o_0||, o_0 the read with every step lr_t = 0 (the initial memory, decayed)."""
    from hope_kernels import titans_selfmod_scan
    block = model.blocks[0]
    layer, x = block.attn, block.norm_attn(model.embed(tokens, 0))
    h = layer.proj_in(x).split(layer.splits, dim=-1)[0]
    q, u, _ = layer._inputs(h if layer.conv is None else layer.conv(h), None, None)
    M0 = layer._initial_state(len(tokens))
    o = [titans_selfmod_scan(q, u, layer.lr_bias + shift, layer.decay_bias, None, 1.0,
                             lr_max=layer.lr_max, period=layer.period, initial_state=M0, backend="torch")[0]
         for shift in (0.0, -1e4)]
    return ((o[0] - o[1]).norm() / o[1].norm()).item()


def write_shares(seed: int = 0, periods=(16, 8, 4, 1)) -> str:
    """write_share at initialisation, MQAR (4 pairs, 64 tokens, 64 sequences), identity / orthogonal
    M_k, M_v, per period: a markdown table."""
    tokens = MQARTask(**T64).batch(64, torch.Generator().manual_seed(seed))[0]
    rows = ["| init of M_k, M_v | " + " | ".join(f"period {p}" for p in periods) + " |",
            "|---|" + "---|" * len(periods)]
    for init in ("identity", "orthogonal"):
        shares = []
        for period in periods:
            model = build_model(model_config({"task": "mqar", "task_args": T64, "model": {
                **PAPER, "titans_period": period, "titans_selfmod_init": init}}), seed, backend="torch")
            shares.append(f"{write_share(model, tokens):.2e}")
        rows.append(f"| {init} | " + " | ".join(shares) + " |")
    return "\n".join(rows)


def recall_report(records, out: Path, header: str) -> str:
    names = [c[0] for c in RECALL_CELLS]
    records = [at_step(r, n) for r in records for n in sorted({500, RECALL_STEPS[r["seq_len"]]}) if r["steps"] > n] \
        + list(records)      # every run also at 500 steps (and a long one at the cell's steps): its curve
    records.sort(key=lambda r: (names.index(r["cell"]), r["steps"], r["seed"]))
    rows = aggregate(records, ["cell", "seq_len", "steps"], "accuracy")
    columns = COLUMNS[:1] + [("tokens", lambda r: str(r["seq_len"]))] + COLUMNS[1:]
    md = markdown_table(rows, columns)
    (out / "ablation.md").write_text(header + "\n\n" + md + "\n")
    write_csv_json(records, out / "ablation", ["cell", "seq_len", "steps", "seed", "accuracy", "params", "wall_s",
                                               "load_start", "load_end", "finished", "design"])
    plot_points(rows, lambda r: f"{r['cell']} ({r['steps']:,} steps)" if "tokens" in r["cell"] or r["steps"] != 1000
                else r["cell"], "MQAR accuracy (held-out)",
                "paper HOPE recall: MQAR 4 pairs, 64 tokens (16 where named), 2 layers, dim 64 (dots: seeds)",
                out / "ablation.png", hline=0.9)
    _plot_longest_curves(records, out)
    return terminal_table(rows, columns)


DESIGNS = {"cms": "benchmarks/results/quality_cpu-2core_2026-11-26_cms-ablation",
           "paper-recall": "benchmarks/results/quality_cpu-2core_2026-12-02_paper-hope-recall"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0", help="seeds of every cell (the first three cells always run 0,1,2)")
    p.add_argument("--workers", type=int, default=1, help="parallel training processes (1 thread each)")
    p.add_argument("--cells", default=None, help="comma list of cell numbers (0-based) to run (default: all)")
    p.add_argument("--design", default="cms", choices=sorted(DESIGNS), help="which ablation (module docstring)")
    p.add_argument("--out", default=None, help="results folder (default: the design's committed one)")
    p.add_argument("--reuse", nargs="*", default=(), help="runs.jsonl files whose identical runs are copied (see runner)")
    a = p.parse_args(argv)
    out = Path(a.out or DESIGNS[a.design])
    out.mkdir(parents=True, exist_ok=True)
    if a.design == "paper-recall":
        return recall_main(a, out)
    cells = CELLS if a.cells is None else [CELLS[int(i)] for i in a.cells.split(",")]
    t0, up0 = time.time(), os.getloadavg()
    run_all(jobs([int(s) for s in a.seeds.split(",")], cells), out / "runs.jsonl", a.workers,
            reuse=[Path(r) for r in a.reuse])
    names = [c[0] for c in cells]     # the table: every run of these cells in runs.jsonl (any seeds)
    records = [r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines()) if r["cell"] in names]
    header = (f"CMS ablation: MQAR 4 pairs / 16 tokens, 2 layers, dim 64, 2 heads, M=3, AdamW lr 1e-3 "
              f"constant, batch 64, torch backend, 1 thread per run ({a.workers} parallel). Command: "
              f"`python -m benchmarks.quality.ablation --workers {a.workers}`. This invocation: "
              f"{time.time() - t0:.0f} s, load average at start {up0[0]:.2f}, at end {os.getloadavg()[0]:.2f}. "
              "Cells marked (c9e3a77) ran at commit c9e3a77, whose CMS convolution was an "
              "nn.Conv1d with the same initial weights as ShortConv(init='uniform'); the old block's cells "
              "compute the same as today's code. Wall times of runs made while other jobs shared the "
              "machine are inflated (load average per run in ablation.csv).")
    print(report(records, out, header))
    return 0


def recall_main(a, out: Path) -> int:
    cells = RECALL_CELLS if a.cells is None else [RECALL_CELLS[int(i)] for i in a.cells.split(",")]
    t0, up0 = time.time(), os.getloadavg()
    run_all(recall_jobs([int(s) for s in a.seeds.split(",")], cells), out / "runs.jsonl", a.workers,
            reuse=[Path(r) for r in a.reuse])
    names = {c[0] for c in RECALL_CELLS}
    records = [r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines()) if r["cell"] in names]
    header = (f"paper HOPE recall: MQAR 4 pairs at 64 tokens (1,000 steps) and 16 tokens (3,000 steps), 2 layers, "
              f"dim 64, 2 heads, AdamW lr 1e-3 constant, batch 64, torch backend, 1 thread per run "
              f"({a.workers} parallel). Command: `python -m benchmarks.quality.ablation --design paper-recall "
              f"--workers {a.workers}`. This invocation: {time.time() - t0:.0f} s, load average at start "
              f"{up0[0]:.2f}, at end {os.getloadavg()[0]:.2f}; runs made while other jobs shared the machine have "
              "inflated wall times (load per run in ablation.csv).")
    table = recall_report(records, out, header)
    shares = write_shares()
    (out / "write_share.md").write_text(
        "Share of the first Titans layer's read that comes from the sequence's writes at initialisation, "
        "||o - o_0|| / ||o_0|| (o_0: every step lr_t = 0; benchmarks.quality.ablation.write_share), MQAR 4 pairs "
        "/ 64 tokens, 64 sequences, seed 0.\n\n" + shares + "\n")
    print(table + "\n\nwrite share at initialisation:\n" + shares)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
