"""Aggregation over seeds, markdown / terminal tables, CSV / JSON and PNG plots of the quality runs."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def at_step(r: dict, step: int) -> dict:
    """The record a run of `step` steps would have written, read off the curve of a run of r["steps"]
    >= step steps (exact: the learning rate is constant and batches depend only on seed and step)."""
    if step == r["steps"]:
        return r
    point = next(c for c in r["curve"] if c["step"] == step)
    metric = {k: point[k] for k in ("accuracy", "bpb") if k in point}
    return {**r, **metric, "steps": step, "wall_s": r["wall_s"] * step / r["steps"],
            "curve": [c for c in r["curve"] if c["step"] <= step], "accuracy_by_pair": None}


def aggregate(records: Sequence[dict], group: Sequence[str], metric: str) -> List[dict]:
    """One row per distinct value of the `group` fields (first-seen order): n, mean, std (sample,
    0 for one seed), min, max and the per-seed values of `metric`, mean wall time and params."""
    rows: Dict[tuple, dict] = {}
    for r in records:
        k = tuple(r[g] for g in group)
        row = rows.setdefault(k, {**{g: r[g] for g in group}, "values": [], "seeds": [], "walls": [],
                                  "params": r["params"]})
        row["values"].append(r[metric])
        row["seeds"].append(r["seed"])
        row["walls"].append(r["wall_s"])
    for row in rows.values():
        v = row["values"]
        row.update(n=len(v), mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0,
                   min=min(v), max=max(v), wall_s=statistics.fmean(row.pop("walls")))
    return list(rows.values())


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """columns: (header, function of the row -> str)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def terminal_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    cells = [[h for h, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(out)


def mean_spread(r: dict, digits: int = 3) -> str:
    """'mean ± std [min, max]' (n seeds) as a cell."""
    if r["n"] == 1:
        return f"{r['mean']:.{digits}f}"
    return f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f} [{r['min']:.{digits}f}, {r['max']:.{digits}f}]"


def write_csv_json(records: Sequence[dict], path_stem: Path, fields: Sequence[str]) -> None:
    """path_stem.csv: one row per run (the scalar fields); path_stem.json: every record in full."""
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), (dict, list)) else r.get(k)) for k in fields})
    path_stem.with_suffix(".json").write_text(json.dumps(list(records), indent=1))


def mean_curve(records: Sequence[dict], metric: str):
    """(steps, mean, min, max) of a learning-curve metric over the records (seeds)."""
    curves = [{c["step"]: c[metric] for c in r["curve"]} for r in records]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    vals = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_curves(groups: Dict[str, Sequence[dict]], metric: str, ylabel: str, title: str, path: Path,
                logy: bool = False) -> None:
    """Mean learning curve per group with the min-max band over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in groups.items():
        steps, mean, lo, hi = mean_curve(recs, metric)
        line, = ax.plot(steps, mean, label=f"{name} (n={len(recs)})")
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_points(rows: Sequence[dict], label: Callable[[dict], str], ylabel: str, title: str, path: Path,
                hline: Optional[float] = None) -> None:
    """Per row: every seed as a dot and the mean as a bar (the ablation cells)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    ax.bar(xs, [r["mean"] for r in rows], color="#9ecae1", label="mean over seeds")
    for x, r in zip(xs, rows):
        ax.scatter([x] * r["n"], r["values"], color="#08519c", s=14, zorder=3)
    if hline is not None:
        ax.axhline(hline, color="gray", ls="--", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label(r) for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
