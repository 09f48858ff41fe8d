"""`python -m benchmarks.model`: the HOPE language model end to end, per backend and attention type.

Measures, for attention in {softmax, linear} (the seed block) and each named variant of
benchmarks/variants.py (--variants, names or keys: transformer, seed-hope, titans-hope, paper-hope,
paper-hope-with-mlp-levels, hope-attention, ...), on each backend (triton on GPU, torch, reference):
- training tokens/s: forward + backward + an update on random byte tokens [B, T]: a plain SGD step
  (default) or torch.optim.AdamW (--optimizer adamw; its first use, in the untimed warm-up step,
  imports torch._dynamo); the median over --train-steps timed steps;
- with --compile, training tokens/s of `torch.compile(model, fullgraph=True)` (inductor) next to
  eager's, the same steps after one untimed compiling step;
- generation tokens/s: `HOPE.generate` (greedy, KV / recurrent caches) from a short prompt;
- latency per generated token vs prefix length P: one cached decode step after a P-token prefill
  (flat in P for the linear path, whose caches are fixed-size states; growing for softmax, whose
  KV cache grows), and one uncached step, i.e. a forward over the whole prefix (what generation
  without caches pays per token: growing with P for both).

Writes model_results.csv / model_results.json and model_latency.png into --out.

The paper's HOPE at the peer measurement's shape, with the seed block and a Transformer:
    python -m benchmarks.model --device cpu --threads 2 --backends torch --attentions "" \
        --variants transformer,seed-hope,paper-hope --vocab 256 --dim 256 --layers 4 --heads 4 --batch 8 \
        --seq-len 256 --optimizer adamw --train-steps 5
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch

from hope_kernels.utils import triton_unavailable_reason

from .ops.timing import quantile
from .variants import VARIANTS, variant


@dataclass
class ModelBenchConfig:
    dim: int
    num_layers: int
    num_heads: int
    num_memory_modules: int
    batch: int
    seq_len: int                       # training context
    prompt_len: int                    # generation tokens/s: prompt length
    new_tokens: int                    # generation tokens/s: tokens generated
    prefixes: Sequence[int]            # latency per token vs prefix length
    backends: Sequence[str]
    attentions: Sequence[str] = ("softmax", "linear")
    variants: Sequence[str] = ()       # named variants (VARIANTS), measured for throughput
    vocab_size: int = 256
    optimizer: str = "sgd"             # "sgd" | "adamw"
    train_steps: int = 3
    latency_reps: int = 5
    dtype: str = "float32"             # autocast dtype on GPU ("bfloat16"); float32 runs without autocast
    compile: bool = False              # also time training of torch.compile(model, fullgraph=True)


ATTENTIONS = ("softmax", "linear", "titans")   # --attentions: the seed block with this attention
# measured by default: the variants that are not a row of the attention sweep (the seed HOPE is its softmax row)
DEFAULT_VARIANTS = ("Transformer", "Titans HOPE", "paper HOPE", "paper HOPE with MLP levels", "Hope-attention")


def default_config(gpu: bool, quick: bool = False) -> ModelBenchConfig:
    if gpu:
        return ModelBenchConfig(dim=512, num_layers=6, num_heads=8, num_memory_modules=4, batch=8,
                                seq_len=1024 if not quick else 512, prompt_len=64, new_tokens=64 if not quick else 32,
                                prefixes=(128, 512, 2048, 8192) if not quick else (128, 512, 2048),
                                backends=("triton", "torch"), dtype="bfloat16",
                                variants=() if quick else DEFAULT_VARIANTS)
    if quick:
        return ModelBenchConfig(dim=32, num_layers=1, num_heads=2, num_memory_modules=2, batch=1, seq_len=32,
                                prompt_len=4, new_tokens=4, prefixes=(8, 32, 128), backends=("torch",),
                                train_steps=2, latency_reps=3)
    return ModelBenchConfig(dim=128, num_layers=2, num_heads=4, num_memory_modules=4, batch=4, seq_len=256,
                            prompt_len=16, new_tokens=32, prefixes=(32, 128, 512, 1024),
                            backends=("torch", "reference"),
                            variants=DEFAULT_VARIANTS)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, dtype: str):
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def variant_kwargs(name: str) -> dict:
    """HOPE keywords of a variant (an attention name alone means the seed block with that attention)."""
    if name in ATTENTIONS:
        return dict(attention=name, cms="multiscale")
    return dict(variant(name).overrides)


def _build(cfg: ModelBenchConfig, name: str, backend: str, device, max_len: int):
    from hope import HOPE
    torch.manual_seed(0)
    kw = {**variant_kwargs(name), **dict(vocab_size=cfg.vocab_size, dim=cfg.dim, num_layers=cfg.num_layers,
                                        num_heads=cfg.num_heads, head_dim=None, max_seq_len=max_len,
                                        backend=backend)}
    if kw.get("cms", "multiscale") == "multiscale":
        kw["num_memory_modules"] = cfg.num_memory_modules
    return HOPE(**kw).to(device)


def train_tokens_per_s(model, cfg: ModelBenchConfig, device) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.seq_len + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(params, lr=1e-4) if cfg.optimizer == "adamw" else None

    def step():
        with _autocast(device, cfg.dtype):
            loss = model(x, y)[1]
        loss.backward()
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                live = [p for p in params if p.grad is not None]
                torch._foreach_add_(live, [p.grad for p in live], alpha=-1e-4)
        for p in params:
            p.grad = None

    step()  # warm-up (Triton compilation, allocator, optimizer state)
    times = []
    for _ in range(cfg.train_steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return cfg.batch * cfg.seq_len / statistics.median(times)


@torch.no_grad()
def generate_tokens_per_s(model, cfg: ModelBenchConfig, device) -> float:
    prompt = torch.randint(0, cfg.vocab_size, (cfg.batch, cfg.prompt_len), device=device)
    with _autocast(device, cfg.dtype):
        model.generate(prompt, max_new_tokens=2, temperature=0.0)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=cfg.new_tokens, temperature=0.0)
        _sync(device)
    return cfg.batch * cfg.new_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def latency_per_token(model, cfg: ModelBenchConfig, device, prefix: int, cached: bool) -> List[float]:
    """Milliseconds for one more token after `prefix` tokens, with or without caches (reps of it)."""
    model.eval()
    seq = torch.randint(0, cfg.vocab_size, (1, prefix + 1), device=device)
    times = []
    with _autocast(device, cfg.dtype):
        for _ in range(cfg.latency_reps + 1):
            if cached:
                cache = model.new_cache()
                model(seq[:, :prefix], cache=cache)  # prefill (not timed)
                _sync(device)
                t0 = time.perf_counter()
                model(seq[:, prefix:], cache=cache)
            else:
                _sync(device)
                t0 = time.perf_counter()
                model(seq)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return times[1:]  # first rep is a warm-up


def _throughput(cfg: ModelBenchConfig, device, max_len: int, result: Dict, log) -> None:
    for backend in cfg.backends:
        if backend == "triton" and triton_unavailable_reason(device):
            result["notes"].append(f"backend triton skipped: {triton_unavailable_reason(device)}")
            continue
        for attention in list(cfg.attentions) + list(cfg.variants):
            try:
                model = _build(cfg, attention, backend, device, max_len)
                train = train_tokens_per_s(model, cfg, device)
                gen = generate_tokens_per_s(model, cfg, device)
                row = {"attention": attention, "backend": backend, "train_tokens_per_s": train,
                       "generate_tokens_per_s": gen}
                if cfg.compile:   # the first (warm-up) step compiles
                    torch._dynamo.reset()
                    row["train_compiled_tokens_per_s"] = train_tokens_per_s(torch.compile(model, fullgraph=True),
                                                                            cfg, device)
            except Exception as exc:
                result["notes"].append(f"{attention}/{backend}: failed: {type(exc).__name__}: {exc}")
                continue
            result["throughput"].append(row)
            compiled = f"   compiled {row['train_compiled_tokens_per_s']:10.1f} tok/s" if cfg.compile else ""
            log(f"[model] {attention:26s} {backend:9s} train {train:10.1f} tok/s{compiled}   generate {gen:8.1f} "
                f"tok/s (load {os.getloadavg()[0]:.1f})")


def _latency(cfg: ModelBenchConfig, device, max_len: int, result: Dict, log) -> None:
    """On the first backend of the list that can run (the fastest)."""
    backend = next((b for b in cfg.backends if b != "triton" or not triton_unavailable_reason(device)), None)
    for attention in cfg.attentions if backend else ():
        model = _build(cfg, attention, backend, device, max_len)
        for cached in (True, False):
            for prefix in cfg.prefixes:
                try:
                    ts = latency_per_token(model, cfg, device, prefix, cached)
                except Exception as exc:  # e.g. out of memory at the longest uncached prefix
                    result["notes"].append(f"latency {attention}/cache={cached}/prefix={prefix}: failed: "
                                           f"{type(exc).__name__}: {exc}")
                    break
                result["latency"].append({"attention": attention, "backend": backend, "cache": cached,
                                          "prefix": prefix, "p50_ms": quantile(ts, 0.5),
                                          "p20_ms": quantile(ts, 0.2), "p80_ms": quantile(ts, 0.8)})
                log(f"[model] latency {attention:7s} cache={str(cached):5s} prefix={prefix:<6d} "
                    f"{quantile(ts, 0.5):9.3f} ms/token")


def hope_unavailable() -> Optional[str]:
    try:
        from hope import HOPE  # noqa: F401
    except Exception as exc:
        return f"hope.HOPE is not importable ({type(exc).__name__}: {exc})"
    return None


def run(cfg: ModelBenchConfig, device: torch.device, out_dir: Optional[str] = None, log=None) -> Dict:
    """All measurements as {"config", "throughput": [...], "latency": [...], "skipped"}; writes files."""
    log = log or (lambda msg: print(msg, flush=True))
    why = hope_unavailable()
    if why:
        log(f"[model] skipped: {why}")
        return {"skipped": why}
    result = {"config": asdict(cfg), "device": device.type, "throughput": [], "latency": [], "notes": [],
              "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    max_len = max(cfg.seq_len, cfg.prompt_len + cfg.new_tokens, max(cfg.prefixes) + 1)
    try:
        _throughput(cfg, device, max_len, result, log)
        _latency(cfg, device, max_len, result, log)
    except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: keep what was measured
        result["notes"].append("interrupted: the model benchmark is incomplete")
    result["load_after"] = os.getloadavg()
    if out_dir:
        write(result, out_dir)
    return result


def table(result: Dict) -> str:
    if "skipped" in result:
        return f"model benchmark skipped: {result['skipped']}"
    c = result["config"]
    load = "".join(f", load {result[k][0]:.1f} {k[5:]}" for k in ("load_before", "load_after") if k in result)
    lines = [f"HOPE vocab={c.get('vocab_size', 256)} dim={c['dim']} layers={c['num_layers']} heads={c['num_heads']} "
             f"M={c['num_memory_modules']} B={c['batch']} T={c['seq_len']} ({c['dtype']}, {result['device']}, "
             f"{result.get('threads', '?')} threads, {c.get('optimizer', 'sgd')}{load})",
             f"{'model':26s} {'backend':9s} {'train tok/s':>12s} {'compiled':>10s} {'generate tok/s':>15s}"]
    for r in result["throughput"]:
        lines.append(f"{r['attention']:26s} {r['backend']:9s} {r['train_tokens_per_s']:12.1f} "
                     f"{r.get('train_compiled_tokens_per_s', float('nan')):10.1f} {r['generate_tokens_per_s']:15.1f}")
    if result["latency"]:
        prefixes = sorted({r["prefix"] for r in result["latency"]})
        lines += ["", "ms per generated token vs prefix length (batch 1):",
                  f"{'attention':9s} {'cache':6s} " + " ".join(f"{p:>9d}" for p in prefixes)]
        series: Dict = {}
        for r in result["latency"]:
            series.setdefault((r["attention"], r["cache"]), {})[r["prefix"]] = r["p50_ms"]
        for (att, cached), vals in series.items():
            lines.append(f"{att:9s} {('yes' if cached else 'no'):6s} " +
                         " ".join(f"{vals.get(p, float('nan')):9.3f}" for p in prefixes))
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def write(result: Dict, out_dir: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "model_results.json"), os.path.join(out_dir, "model_results.csv")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "attention", "backend", "cache", "prefix", "value", "unit", "p20", "p80"])
        for r in result["throughput"]:
            w.writerow(["train", r["attention"], r["backend"], "", "", r["train_tokens_per_s"], "tokens/s", "", ""])
            if "train_compiled_tokens_per_s" in r:
                w.writerow(["train_compiled", r["attention"], r["backend"], "", "", r["train_compiled_tokens_per_s"],
                            "tokens/s", "", ""])
            w.writerow(["generate", r["attention"], r["backend"], "yes", "", r["generate_tokens_per_s"], "tokens/s", "", ""])
        for r in result["latency"]:
            w.writerow(["latency", r["attention"], r["backend"], "yes" if r["cache"] else "no", r["prefix"],
                        r["p50_ms"], "ms/token", r["p20_ms"], r["p80_ms"]])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    if result["latency"]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        series: Dict = {}
        for r in result["latency"]:
            series.setdefault((r["attention"], r["cache"]), []).append((r["prefix"], r["p50_ms"]))
        for (att, cached), pts in series.items():
            pts.sort()
            ax.plot([p for p, _ in pts], [t for _, t in pts], marker="o",
                    linestyle="-" if cached else "--", label=f"{att}, {'cached' if cached else 'no cache'}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prefix length")
        ax.set_ylabel("ms per generated token (p50)")
        ax.set_title(f"HOPE generation latency ({result['device']})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "model_latency.png"))
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    p.add_argument("--backends", default=None, help="comma list of triton,torch,reference")
    p.add_argument("--attentions", default="softmax,linear",
                   help="seed-block attention types to measure (throughput and latency); '' for none")
    p.add_argument("--variants", default=None,
                   help=f"comma list of variants of benchmarks/variants.py, names or keys "
                        f"({','.join(v.key for v in VARIANTS)}); default: {','.join(DEFAULT_VARIANTS)} "
                        "(none with --quick); '' for none")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (median reported)")
    p.add_argument("--prefixes", default=None, help="comma list of prefix lengths for the latency curve")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument("--compile", action="store_true",
                   help="also time training compiled with torch.compile(model, fullgraph=True), next to eager")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = default_config(device.type == "cuda", args.quick)
    if args.backends:
        cfg.backends = tuple(args.backends.split(","))
    cfg.attentions = tuple(a for a in args.attentions.split(",") if a)
    if args.variants is not None:
        cfg.variants = tuple(v for v in args.variants.split(",") if v)
    try:
        cfg.variants = tuple(variant(v).name for v in cfg.variants)
    except ValueError as e:
        p.error(str(e))
    if args.prefixes:
        cfg.prefixes = tuple(int(x) for x in args.prefixes.split(","))
    for name, field in (("dim", "dim"), ("layers", "num_layers"), ("batch", "batch"), ("seq_len", "seq_len"),
                        ("vocab", "vocab_size"), ("heads", "num_heads"), ("optimizer", "optimizer"),
                        ("train_steps", "train_steps")):
        if getattr(args, name) is not None:
            setattr(cfg, field, getattr(args, name))
    cfg.compile = args.compile
    result = run(cfg, device, args.out)
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
