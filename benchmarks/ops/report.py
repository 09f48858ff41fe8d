"""Outputs of a sweep: the terminal table, one CSV and one JSON of every row, log-log PNG plots."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

COLUMNS = [
    "op", "provider", "mode", "B", "T", "H", "K", "V", "M", "dtype", "metric", "unit",
    "p50", "p20", "p80", "rel_err", "bytes", "flops", "achieved_GBps", "achieved_TFLOPs",
    "bw_frac", "flops_frac", "device", "device_name", "torch_version", "triton_version", "timestamp",
]
CSV_NAME, JSON_NAME = "results.csv", "results.json"


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _paired(rows: List[dict]) -> List[Tuple[dict, Optional[dict]]]:
    """(time row, peak_mem row) per measurement, in sweep order."""
    mem = {_key(r): r for r in rows if r["metric"] == "peak_mem"}
    return [(r, mem.get(_key(r))) for r in rows if r["metric"] == "time"]


def _key(r: dict):
    return (r["op"], r["provider"], r["mode"], r["B"], r["T"], r["H"], r["K"], r["V"], r["M"])


def table(rows: List[dict], meta: dict, notes: List[str] = ()) -> str:
    gpu = meta.get("device") == "cuda"
    head = (f"{'op':27s} {'mode':7s} {'T':>6s} {'provider':9s} {'p50 ms':>10s} {'[p20, p80]':>21s} "
            f"{'mem MB':>8s} {'rel_err':>8s} {'GB/s':>8s} {'TFLOP/s':>8s} {'%bw':>5s} {'%mm':>5s}")
    lines = [
        f"device: {meta['device_name']} | dtype {meta['dtype']} | torch {meta['torch_version']} | "
        f"triton {meta['triton_version']} | {meta['timestamp']}",
        f"peaks measured in this run: copy {meta['peak_bw'] / 1e9:.1f} GB/s, "
        f"{meta['peak_flops_dtype']} matmul {meta['peak_flops'] / 1e12:.2f} TFLOP/s",
    ]
    loads = [x for x in (meta.get("load_avg_start"), meta.get("load_avg_end")) if x is not None]
    if not gpu and loads and meta.get("cpu_count") and max(loads) > 0.5 * meta["cpu_count"]:
        lines.append(f"note: system load average {max(loads):.1f} on {meta['cpu_count']} cores during the run "
                     "(other jobs): CPU timings are noisy; --threads 1 is steadier on a busy machine.")
    if not gpu:
        lines.append("CPU-only run: GPU timings (Triton kernels, flash-linear-attention) need CUDA; "
                     "run benchmarks/gpu_suite.sh on a GPU machine.")
    lines += [head, "-" * len(head)]
    last = None
    for t, m in _paired(rows):
        group = (t["op"], t["mode"])
        if last is not None and group != last:
            lines.append("")
        last = group
        spread = f"[{_fmt(t['p20'], '.3f')}, {_fmt(t['p80'], '.3f')}]"
        lines.append(
            f"{t['op']:27s} {t['mode']:7s} {t['T']:6d} {t['provider']:9s} {t['p50']:10.3f} {spread:>21s} "
            f"{_fmt(m and m['p50'], '8.1f', '     n/a'):>8s} {_fmt(t['rel_err'], '8.1e'):>8s} "
            f"{_fmt(t['achieved_GBps'], '8.2f'):>8s} {_fmt(t['achieved_TFLOPs'], '8.3f'):>8s} "
            f"{_fmt(t['bw_frac'] and 100 * t['bw_frac'], '5.1f'):>5s} {_fmt(t['flops_frac'] and 100 * t['flops_frac'], '5.1f'):>5s}")
    if notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in notes]
    lines.append("mem MB: extra peak memory of one call (CUDA allocator peak, or peak RSS rise on the CPU); "
                 "rel_err: vs the float64 reference at the smallest T; %bw / %mm: achieved fraction of "
                 "the measured copy bandwidth / matmul throughput (formulas: benchmarks/ops/roofline.py).")
    return "\n".join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_json(rows: List[dict], meta: dict, notes: List[str], path: str) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "notes": notes, "rows": rows}, f, indent=1, default=str)


def plot(rows: List[dict], meta: dict, out_dir: str) -> List[str]:
    """One log-log PNG of time vs T per (op, mode), a line per provider. [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    series: Dict[Tuple[str, str], Dict[str, List[Tuple[int, float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] == "time":
            series[(r["op"], r["mode"])][r["provider"]].append((r["T"], r["p50"], r["p20"], r["p80"]))
    paths = []
    for (op, mode), by_provider in series.items():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for provider, pts in sorted(by_provider.items()):
            pts.sort()
            ts = [p[0] for p in pts]
            ax.plot(ts, [p[1] for p in pts], marker="o", label=provider)
            ax.fill_between(ts, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
        _guides(ax, by_provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T" if "step" not in op and op != "ema_update_" else
                      ("context length T" if "step" in op else "T (buffer = B*T*H*K elements)"))
        ax.set_ylabel("time per call (ms, p50, p20-p80 band)")
        ax.set_title(f"{op} {mode} ({meta['dtype']}, {meta['device_name'][:40]})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _guides(ax, by_provider) -> None:
    """Faint O(T) and O(T^2) lines through the lowest first point, so the slopes read at a glance."""
    firsts = [pts[0] for pts in by_provider.values() if pts]
    t_all = sorted({p[0] for pts in by_provider.values() for p in pts})
    if len(t_all) < 2 or not firsts:
        return
    t0, y0 = min((p[0], p[1]) for p in firsts)
    for power, style in ((1, ":"), (2, "--")):
        ax.plot(t_all, [y0 * (t / t0) ** power for t in t_all], style, color="gray", alpha=0.5, linewidth=1,
                label=f"O(T^{power})" if power > 1 else "O(T)")


def write_all(result, out_dir: str, plots: bool = True) -> Dict[str, object]:
    """CSV, JSON and table first (cheap), then the plots; an interrupt while plotting keeps the rest."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, JSON_NAME)
    write_csv(result.rows, csv_path)
    write_json(result.rows, result.meta, result.notes, json_path)
    text = table(result.rows, result.meta, result.notes)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(text + "\n")
    paths: List[str] = []
    if plots:
        try:
            paths = plot(result.rows, result.meta, out_dir)
        except KeyboardInterrupt:
            text += "\n(interrupted while plotting: some plots are missing)"
    return {"csv": csv_path, "json": json_path, "plots": paths, "table": text}


def markdown_summary(rows: List[dict], meta: dict, modes=("fwd", "bwd", "fwd+bwd")) -> str:
    """Headline table (markdown): p50 ms per provider for each op and mode, at the largest T measured
    and at the largest T the reference reached; used for the results folders' READMEs."""
    times = [r for r in rows if r["metric"] == "time" and r["mode"] in modes]
    providers = [p for p in ("triton", "torch", "fla", "reference", "sdpa") if any(r["provider"] == p for r in times)]
    by = {(r["op"], r["mode"], r["T"], r["provider"]): r["p50"] for r in times}
    groups = list(dict.fromkeys((r["op"], r["mode"]) for r in times))
    lines = ["| op | mode | T | " + " | ".join(f"{p} (ms)" for p in providers) + " |",
             "|---|---|---|" + "---|" * len(providers)]
    for op, mode in groups:
        ts = sorted({r["T"] for r in times if (r["op"], r["mode"]) == (op, mode)})
        ref_ts = sorted({r["T"] for r in times if (r["op"], r["mode"], r["provider"]) == (op, mode, "reference")})
        show = sorted({ts[-1]} | ({ref_ts[-1]} if ref_ts and "step" not in op and op != "ema_update_" else set()))
        for t in show:
            cells = [_fmt(by.get((op, mode, t, p)), ".3g") for p in providers]
            lines.append(f"| {op} | {mode} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    with open(os.path.join(sys.argv[1] if len(sys.argv) > 1 else "bench_out", JSON_NAME)) as f:
        data = json.load(f)
    print(markdown_summary(data["rows"], data["meta"], *(sys.argv[2:3] and [sys.argv[2].split(",")])))
