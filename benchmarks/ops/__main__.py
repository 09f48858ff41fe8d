"""`python -m benchmarks` (= `python -m benchmarks.ops`): speed, memory and numerics of every op against its
references and peers.

Runs each op (linear_attention causal / non-causal, cms_scan with / without mix, titans_scan, the step kernels,
ema_update_) through each available provider (triton, torch, reference, sdpa, fla) in fwd, bwd and
fwd+bwd over a sweep of T, prints a table and writes results.csv, results.json, table.txt and
PNG plots into --out. Without CUDA it runs the CPU providers at small sizes in a few minutes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_CPU = {"providers": "torch,reference,sdpa", "seq_lens": "128,256,512,1024,2048", "batch": 2, "heads": 4,
        "head_dim": 64, "dtype": "float32"}
_CPU_QUICK = {"seq_lens": "64,128,256", "batch": 1, "heads": 2, "head_dim": 32}
_GPU = {"providers": "triton,torch,sdpa,fla", "seq_lens": "1024,2048,4096,8192,16384", "batch": 4, "heads": 16,
        "head_dim": 64, "dtype": "bfloat16"}
_GPU_QUICK = {"seq_lens": "512,1024,2048"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all", help="comma list of ops, or 'all' (see --list)")
    p.add_argument("--providers", default=None,
                   help="comma list of triton,torch,reference,sdpa,fla (default: GPU triton,torch,sdpa,fla; "
                        "CPU torch,reference,sdpa, plus triton with --interpret)")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--seq-lens", default=None, help="comma list of T (default: GPU 1K..16K, CPU 128..2048)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None, help="K (and V unless --value-dim)")
    p.add_argument("--value-dim", type=int, default=None)
    p.add_argument("--memories", type=int, default=4, help="M, the CMS timescales")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench_out", help="output folder (default: bench_out/)")
    p.add_argument("--quick", action="store_true", help="a smaller sweep (seconds on a CPU)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: run the Triton provider through TRITON_INTERPRET=1 (slow; small T)")
    p.add_argument("--reference-max-t", type=int, default=256,
                   help="largest T for the token-by-token reference scans (default 256)")
    p.add_argument("--max-call-s", type=float, default=5.0,
                   help="a provider slower than this per call skips the larger T (default 5 s)")
    p.add_argument("--budget-s", type=float, default=0.25, help="CPU timer: seconds spent per measurement")
    p.add_argument("--min-reps", type=int, default=3, help="CPU timer: timed calls at least (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: all cores, or 1 when the load average already "
                        "reaches the core count: multi-threaded ops slow down many times on a busy CPU)")
    p.add_argument("--model", action="store_true", help="also run the model-level benchmark (benchmarks.model, tiny)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list the ops and providers and exit")
    return p


def _auto_threads():
    """1 on a CPU that is already busy (load average >= cores), else None (torch's default)."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None
    if busy:
        print(f"[bench] load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: torch runs on one thread "
              "(--threads N overrides)", flush=True)
        return 1
    return None


def _ints(s: str):
    return [int(x) for x in s.split(",") if x.strip()]


def _names(s: str, allowed, what: str):
    names = list(allowed) if s == "all" else [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return names


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    threads = args.threads or _auto_threads()
    if threads:
        torch.set_num_threads(threads)
    from . import report, suite
    from .cases import MODES, OPS, PROVIDERS

    if args.list:
        print("ops:", ", ".join(OPS))
        print("providers:", ", ".join(PROVIDERS))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.interpret and gpu:
        raise SystemExit("--interpret is for CPU runs (the Triton provider runs natively on CUDA)")
    defaults = dict(_GPU if gpu else _CPU)
    if args.quick:
        defaults.update(_GPU_QUICK if gpu else _CPU_QUICK)
    if args.interpret:
        defaults["providers"] = "triton," + defaults["providers"]
    head_dim = args.head_dim or defaults["head_dim"]
    cfg = suite.Config(
        ops=_names(args.ops, OPS, "op"),
        providers=_names(args.providers or defaults["providers"], PROVIDERS, "provider"),
        modes=_names(args.modes, MODES, "mode"),
        seq_lens=_ints(args.seq_lens or defaults["seq_lens"]),
        batch=args.batch or defaults["batch"],
        heads=args.heads or defaults["heads"],
        head_dim=head_dim,
        value_dim=args.value_dim or head_dim,
        memories=args.memories,
        dtype=getattr(torch, args.dtype or defaults["dtype"]),
        device=device,
        reference_max_t=args.reference_max_t,
        max_call_s=args.max_call_s,
        budget_s=args.budget_s,
        min_reps=args.min_reps,
    )
    if not gpu:
        print("[bench] no CUDA device: running the CPU providers at small sizes. GPU timings (Triton "
              "kernels, flash-linear-attention) need CUDA: run benchmarks/gpu_suite.sh on a GPU machine.")
    t0 = time.perf_counter()
    result = suite.run(cfg)
    if args.model:
        from .. import model
        result.meta["model"] = model.run(model.default_config(gpu, quick=True), device, out_dir=args.out)
    files = report.write_all(result, args.out, plots=not args.no_plots)
    print()
    print(files["table"])
    if args.model:
        print()
        print(model.table(result.meta["model"]))
    print(f"\n[bench] {len(result.rows)} rows in {time.perf_counter() - t0:.1f} s -> {args.out}/ "
          f"({report.CSV_NAME}, {report.JSON_NAME}, table.txt, {len(files['plots'])} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
