"""The sweep: every (op, provider, mode, T) timed, its peak memory taken, its numerics checked.

Each measurement gives two rows, metric "time" (ms, p50/p20/p80) and metric "peak_mem" (MB), both
carrying the roofline columns (bytes, flops, achieved fractions) and the relative error against
the float64 reference. The relative error is measured once per (op, provider) at the smallest T
of the sweep (batch capped at 2, the reference loops per token; T halved where the reference's
autograd graph would pass 4 GB, with a note) and reported on those rows:
outputs for "fwd", the worst input gradient for "bwd", the worse of both for "fwd+bwd".
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import roofline
from .cases import CASES, Case, Inputs, exact, provider_unavailable
from .roofline import Shape
from .timing import make_timer, peak_memory

REL_ERR_MAX_BATCH = 2
REL_ERR_MAX_BYTES = 4e9


@dataclass
class Config:
    ops: Sequence[str]
    providers: Sequence[str]
    modes: Sequence[str]
    seq_lens: Sequence[int]
    batch: int
    heads: int
    head_dim: int
    value_dim: int
    memories: int
    dtype: torch.dtype
    device: torch.device
    reference_max_t: int = 256     # the token-by-token reference scans only run up to this T
    max_call_s: float = 5.0        # a provider slower than this per call skips the larger T
    budget_s: float = 0.25         # CPU timer: time spent repeating one measurement
    min_reps: int = 3              # CPU timer: timed calls at least
    seed: int = 0


@dataclass
class Result:
    rows: List[dict]
    meta: dict
    notes: List[str] = field(default_factory=list)


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton missing or broken: the torch paths still run
        triton_version = None
    import hope_kernels
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "dtype": str(dtype).replace("torch.", ""),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "hope_kernels_version": hope_kernels.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_start": _load(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _load() -> Optional[float]:
    """1-minute system load average (other jobs on the machine make CPU timings noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    n = torch.get_num_threads()
    threads = f"{n} thread{'s' if n != 1 else ''}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({threads})"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({threads})"


# --------------------------------------------------------------------------- numerics
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return (out64 - ref64).norm().item() / max(ref64.norm().item(), 1e-30)


def _run_with_grads(case: Case, provider: str, inp: Inputs, do: Optional[torch.Tensor]):
    inp = inp.clone()
    for t in inp.leaves():
        t.grad = None
    out = case.call(provider, inp.args)
    grads = None
    if do is not None and inp.grads:
        out.backward(do.to(out.dtype))
        grads = [t.grad for t in inp.leaves()]
    return out, grads


def rel_errors(case: Case, providers: Sequence[str], shape: Shape, cfg: Config,
               notes: List[str]) -> Dict[str, Dict[str, float]]:
    """{provider: {"fwd": err, "bwd": err, "fwd+bwd": err}} against the float64 reference."""
    torch.manual_seed(cfg.seed + 1)
    differentiable = len(case.modes) > 1
    inp = case.make(shape, cfg.dtype, cfg.device, differentiable)
    ref_inp = inp.as_float64().clone()
    ref_out = case.call("reference", ref_inp.args)
    do = torch.randn_like(ref_out) if differentiable else None
    if do is not None:
        ref_out.backward(do)
    ref_grads = [t.grad for t in ref_inp.leaves()]
    errs = {}
    for provider in providers:
        if not exact(case, provider):
            continue
        try:
            out, grads = _run_with_grads(case, provider, inp, do)
        except Exception as exc:  # one broken provider must not hide the others' numbers
            notes.append(f"{case.name}/{provider}: relative error failed: {type(exc).__name__}: {exc}")
            continue
        e_fwd = _rel(out, ref_out)
        e_bwd = max(_rel(g, r) for g, r in zip(grads, ref_grads)) if grads else float("nan")
        errs[provider] = {"fwd": e_fwd, "bwd": e_bwd, "fwd+bwd": max(e_fwd, e_bwd)}
    return errs


def rel_err_shape(case: Case, s: Shape) -> Shape:
    """The shape numerics are checked at: the sweep's smallest, batch capped at 2, and T halved while
    the float64 reference's autograd graph (one state per token) would pass REL_ERR_MAX_BYTES."""
    B = min(s.B, REL_ERR_MAX_BATCH)
    m = s.M if case.name.startswith("cms") else 1
    T = s.T
    while T > 64 and 3 * 8 * B * T * s.H * m * s.K * s.V > REL_ERR_MAX_BYTES:
        T //= 2
    return Shape(B, T, s.H, s.K, s.V, s.M)


# --------------------------------------------------------------------------- timing one case
def timed_fn(case: Case, provider: str, mode: str, inp: Inputs) -> Callable[[], object]:
    leaves = inp.leaves()

    def clear():
        for t in leaves:
            t.grad = None

    fwd = lambda: case.call(provider, inp.args)  # noqa: E731
    if mode == "fwd":
        return fwd
    out = fwd()
    do = torch.randn_like(out)
    if mode == "bwd":
        def bwd():
            clear()
            out.backward(do, retain_graph=True)
        return bwd

    def fwd_bwd():
        clear()
        fwd().backward(do)
    return fwd_bwd


def measure(case: Case, provider: str, mode: str, shape: Shape, cfg: Config, timer) -> Tuple[Tuple[float, float, float], Optional[int]]:
    torch.manual_seed(cfg.seed)
    inp = case.make(shape, cfg.dtype, cfg.device, len(case.modes) > 1)
    fn = timed_fn(case, provider, mode, inp)
    times = timer(fn)
    mem = peak_memory(fn, cfg.device)
    return times, mem


# --------------------------------------------------------------------------- the sweep
def _row(base: dict, case: str, provider: str, mode: str, s: Shape, cfg: Config, metric: str,
         unit: str, q: Tuple[float, float, float], rel: Optional[float], peaks: dict) -> dict:
    nbytes, flops = roofline.cost(case, provider, mode, s, cfg.dtype)
    p50_s = q[0] * 1e-3 if metric == "time" else None
    gbps = nbytes / p50_s / 1e9 if p50_s else None
    tflops = flops / p50_s / 1e12 if p50_s else None
    return {
        "op": case, "provider": provider, "mode": mode,
        "B": s.B, "T": s.T, "H": s.H, "K": s.K, "V": s.V, "M": s.M if case.startswith(("cms", "ema")) else None,
        "dtype": base["dtype"], "metric": metric, "unit": unit,
        "p50": q[0], "p20": q[1], "p80": q[2],
        "rel_err": rel,
        "bytes": nbytes, "flops": flops,
        "achieved_GBps": gbps, "achieved_TFLOPs": tflops,
        "bw_frac": gbps * 1e9 / peaks["peak_bw"] if gbps is not None else None,
        "flops_frac": tflops * 1e12 / peaks["peak_flops"] if tflops is not None else None,
        "device": base["device"], "device_name": base["device_name"],
        "torch_version": base["torch_version"], "triton_version": base["triton_version"],
        "timestamp": base["timestamp"],
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sweep_op(case: Case, cfg: Config, seq_lens, timer, base, peaks, rows, notes, log) -> None:
    op = case.name
    providers = []
    for p in cfg.providers:
        if p not in case.providers:
            continue
        why = provider_unavailable(p, cfg.device)
        if why:
            notes.append(f"{op}: provider {p} skipped: {why}")
        else:
            providers.append(p)
    shapes = [Shape(cfg.batch, t, cfg.heads, cfg.head_dim, cfg.value_dim, cfg.memories) for t in seq_lens]
    s0 = shapes[0]
    err_shape = rel_err_shape(case, s0)
    if err_shape.T != s0.T:
        notes.append(f"{op}: rel_err measured at T={err_shape.T} (the float64 reference's graph is too big at "
                     f"T={s0.T}), reported on the T={s0.T} rows")
    try:
        errs = rel_errors(case, providers, err_shape, cfg, notes)
    except Exception as exc:  # a broken provider must not hide the others' timings
        notes.append(f"{op}: relative errors failed: {type(exc).__name__}: {exc}")
        errs = {}
        _release(cfg.device)
    for provider in providers:
        for mode in (m for m in cfg.modes if m in case.modes):
            for s in shapes:
                if provider == "reference" and not case.long_reference and s.T > cfg.reference_max_t:
                    notes.append(f"{op}: reference run up to T={cfg.reference_max_t} only (token loop; --reference-max-t)")
                    break
                try:
                    q, mem = measure(case, provider, mode, s, cfg, timer)
                except Exception as exc:  # e.g. out of memory at the largest T: keep the rest going
                    notes.append(f"{op}/{provider}/{mode} T={s.T}: failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}")
                    _release(cfg.device)
                    break
                rel = errs.get(provider, {}).get(mode) if s.T == s0.T else None
                rows.append(_row(base, op, provider, mode, s, cfg, "time", "ms", q, rel, peaks))
                mb = None if mem is None else mem / 2**20
                rows.append(_row(base, op, provider, mode, s, cfg, "peak_mem", "MB", (mb, mb, mb), rel, peaks))
                log(f"[bench] {op:27s} {provider:9s} {mode:7s} T={s.T:<6d} {q[0]:10.3f} ms")
                if q[0] * 1e-3 > cfg.max_call_s and s is not shapes[-1]:
                    notes.append(f"{op}/{provider}/{mode}: larger T skipped ({q[0] / 1e3:.1f} s per call "
                                 f"at T={s.T} > --max-call-s {cfg.max_call_s})")
                    break


def run(cfg: Config, log: Callable[[str], None] = None) -> Result:
    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(cfg.seed)
    timer = make_timer(cfg.device, cfg.budget_s, cfg.min_reps)
    base = environment(cfg.device, cfg.dtype)
    t0 = time.perf_counter()
    peaks = roofline.measure_peaks(cfg.device, timer)
    base.update(peaks)
    log(f"[bench] {base['device_name']}: copy {peaks['peak_bw'] / 1e9:.1f} GB/s, "
        f"{peaks['peak_flops_dtype']} matmul {peaks['peak_flops'] / 1e12:.2f} TFLOP/s (measured now)")
    rows: List[dict] = []
    notes: List[str] = []
    seq_lens = sorted(set(cfg.seq_lens))
    try:
        for op in cfg.ops:
            _sweep_op(CASES[op], cfg, seq_lens, timer, base, peaks, rows, notes, log)
    except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: keep what was measured
        notes.append("interrupted: the sweep is incomplete")
        log("[bench] interrupted: writing the rows measured so far")
    base["wall_s"] = time.perf_counter() - t0
    base["load_avg_end"] = _load()
    base["config"] = {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v)
                      for k, v in asdict(cfg).items()}
    base["argv"] = sys.argv
    return Result(rows, base, list(dict.fromkeys(notes)))
