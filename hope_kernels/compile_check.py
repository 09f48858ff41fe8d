"""Ahead-of-time compile check of every Triton kernel for sm_80 / sm_90, with no GPU needed.

Each kernel module lists its kernels with `compile_specs()` (see `hope_kernels.aot`). For every
(spec, config, arch) this module runs `triton.compile` for that GPU target and reads off the
cubin, with the `cuobjdump` shipped in the Triton wheel:

- registers per thread and local memory per thread (stack frame + LOCAL: register spills in a
  Triton kernel; when nonzero, `ptxas -v` is rerun on the PTX for the exact spill stores/loads),
- shared memory per block (Triton's dynamic shared memory + any static shared memory),
- whether tensor-core instructions appear: read from the SASS (`cuobjdump -sass`: HMMA, HGMMA
  on sm_90) when `sass=True`, else from the PTX (`mma.sync` becomes HMMA, `wgmma` HGMMA; ptxas
  never creates tensor-core instructions the PTX does not ask for). Disassembly costs about a
  second per kernel, so tests ask for it on default configs only,
- an occupancy estimate: resident warps per SM as limited by registers (65536 per SM,
  allocated per warp in units of 256), shared memory (per-SM capacity, 1 KiB reserved per
  block), the 64-warp / 32-block limits, over the 64 warps an SM can hold.

tests/test_compile.py and `python -m benchmarks.compile_report` are built on it. Results are
cached per process (Triton also caches compiled kernels on disk).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .aot import KernelConfig, KernelSpec

KERNEL_MODULES = (
    "hope_kernels.linear_attention.triton_kernels",
    "hope_kernels.cms.triton_kernels",
    "hope_kernels.ema.triton_kernels",
)
ARCHS = (80, 90)


@dataclass(frozen=True)
class ArchLimits:
    smem_per_block: int     # opt-in maximum dynamic shared memory of one block
    smem_per_sm: int        # shared memory capacity of one SM
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_smem_per_block: int = 1024


LIMITS = {
    80: ArchLimits(smem_per_block=166912, smem_per_sm=167936),   # A100: 163 KiB / 164 KiB
    90: ArchLimits(smem_per_block=232448, smem_per_sm=233472),   # H100: 227 KiB / 228 KiB
}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    config: str
    default: bool
    num_warps: int
    registers: int = 0
    spill_bytes: int = 0          # local memory per thread (stack frame + LOCAL)
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared_bytes: int = 0
    tensor_cores: str = "-"       # "HGMMA", "HMMA", "HGMMA+HMMA" or "-"
    tc_source: str = ""           # "sass" or "ptx": where tensor_cores was read
    warps_per_sm: int = 0
    occupancy: float = 0.0        # warps_per_sm / max warps per SM
    limiter: str = ""
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= LIMITS[self.arch].smem_per_block

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- spec collection
def collect_specs(modules: Sequence[str] = KERNEL_MODULES, strict: bool = True
                  ) -> Tuple[List[KernelSpec], List[str]]:
    """All KernelSpecs of `modules`, and a list of problems (module missing / no compile_specs).

    With strict=True a problem raises RuntimeError; with strict=False it is only reported.
    """
    specs, problems = [], []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a module that fails to import is a problem to report, not to hide
            problems.append(f"{name}: import failed ({type(e).__name__}: {e})")
            continue
        fn = getattr(mod, "compile_specs", None)
        if fn is None:
            problems.append(f"{name}: has no compile_specs()")
            continue
        try:
            got = list(fn())
        except Exception as e:
            problems.append(f"{name}: compile_specs() raised {type(e).__name__}: {e}")
            continue
        if not got:
            problems.append(f"{name}: compile_specs() returned no kernels")
        for spec in got:
            if not any(c.default for c in spec.configs):
                problems.append(f"{spec.name}: no config is flagged default")
        specs.extend(got)
    if strict and problems:
        raise RuntimeError("compile specs incomplete:\n  " + "\n  ".join(problems))
    return specs, problems


def default_config(spec: KernelSpec) -> KernelConfig:
    return next(c for c in spec.configs if c.default)


def config_label(config: KernelConfig) -> str:
    meta = ",".join(f"{k}={v}" for k, v in config.meta.items())
    return f"{meta + ',' if meta else ''}w{config.num_warps},s{config.num_stages}"


# --------------------------------------------------------------------------- compiling
def unwrap(fn):
    """The kernel under any triton.autotune / triton.heuristics wrappers: a JITFunction, or, when
    TRITON_INTERPRET=1 was set before the kernel module was imported, an InterpretedFunction or
    the plain Python function under it."""
    from triton.runtime.jit import JITFunction

    for _ in range(16):
        if isinstance(fn, (JITFunction, types.FunctionType)) or _is_interpreted(fn):
            return fn
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    raise TypeError(f"{fn!r} is not a Triton kernel (@triton.jit)")


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - a Triton without the interpreter
        return False
    return isinstance(fn, InterpretedFunction)


def _kernel_key(spec: KernelSpec):
    """What identifies the kernel function of a spec (the Python function under any wrapper)."""
    try:
        fn = unwrap(spec.fn)
    except TypeError:
        return id(spec)
    return fn if isinstance(fn, types.FunctionType) else fn.fn


_JIT_OF: Dict[object, object] = {}


def as_jit(fn):
    """A compilable JITFunction for `fn`.

    Under the interpreter (the tests' CPU set-up) `@triton.jit` makes InterpretedFunctions, which
    `triton.compile` cannot take: rebuild a JITFunction from the same Python code (also when a
    spec hands over that plain function), with the @triton.jit helpers it calls through module
    globals rebuilt the same way.
    """
    from triton.runtime.jit import JITFunction

    fn = unwrap(fn)
    if isinstance(fn, JITFunction):
        return fn
    py, kwargs = (fn.fn, getattr(fn, "kwargs", {})) if _is_interpreted(fn) else (fn, {})
    if py not in _JIT_OF:
        scope = dict(py.__globals__)
        clone = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
        clone.__annotations__ = dict(getattr(py, "__annotations__", {}))
        clone.__module__, clone.__qualname__ = py.__module__, py.__qualname__
        _JIT_OF[py] = JITFunction(clone, **kwargs)
        for name, value in list(scope.items()):
            if _is_interpreted(value):
                scope[name] = as_jit(value)
    return _JIT_OF[py]


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (the wheel ships two of them)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # older Triton: one ptxas
        return _tool("ptxas")


def _attrs(fn, spec: KernelSpec) -> Dict[Tuple[int, ...], list]:
    """Alignment hints the JIT would derive for a real call: 16-byte aligned pointers, plus the
    integer arguments the spec names in `divisible_by_16` (so vectorised code is what is measured)."""
    extra = set(getattr(spec, "divisible_by_16", None) or ())
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
            for k, ty in spec.signature.items() if ty.startswith("*") or k in extra}


_CACHE: Dict[tuple, CompileResult] = {}


def compile_config(spec: KernelSpec, config: KernelConfig, arch: int, sass: bool = False) -> CompileResult:
    """Compile one config of one kernel for sm_<arch> and measure it (cached per process)."""
    key = (spec.name, config_label(config), arch)
    hit = _CACHE.get(key)
    if hit is None or (sass and hit.ok and hit.tc_source != "sass"):
        _CACHE[key] = _compile(spec, config, arch, sass)
    return _CACHE[key]


def _compile(spec: KernelSpec, config: KernelConfig, arch: int, sass: bool) -> CompileResult:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    res = CompileResult(spec.name, arch, config_label(config), config.default, config.num_warps)
    t0 = time.perf_counter()
    try:
        fn = as_jit(spec.fn)
        src = triton.compiler.ASTSource(fn=fn, signature=dict(spec.signature),
                                        constexprs={**spec.constexprs, **config.meta},
                                        attrs=_attrs(fn, spec))
        with _interpreter_off():
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as e:  # a compile failure is a result to report (and to fail the test on)
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        res.seconds = time.perf_counter() - t0
        return res
    _measure(res, kernel, arch, sass)
    res.seconds = time.perf_counter() - t0
    return res


@contextlib.contextmanager
def _interpreter_off():
    """Code generation reads TRITON_INTERPRET (constexpr helpers return raw values under the
    interpreter): switch it off while compiling, as in a process that never set it."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _measure(res: CompileResult, kernel, arch: int, sass: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        res.registers = int(fields.get("REG", 0))
        res.spill_bytes = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
        res.shared_bytes = int(kernel.metadata.shared) + int(fields.get("SHARED", 0))
        ptx = kernel.asm["ptx"]
        mma = {name for name, pat in (("HGMMA", r"\bwgmma\.mma_async"), ("HMMA", r"\bmma\.sync"))
               if re.search(pat, ptx)}
        res.tc_source = "ptx"
        if sass and mma:  # confirm on the machine code (nothing to confirm without mma in the PTX)
            code = subprocess.run([_tool("cuobjdump"), "-sass", cubin],
                                  capture_output=True, text=True, check=True).stdout
            mma = set(re.findall(r"\b(HGMMA|HMMA)\.", code))
        if sass:
            res.tc_source = "sass"
        res.tensor_cores = "+".join(sorted(mma)) if mma else "-"
        if res.spill_bytes:
            res.spill_stores, res.spill_loads = _ptxas_spills(kernel.asm["ptx"], arch, tmp)
    res.warps_per_sm, res.limiter = occupancy(res.registers, res.shared_bytes, res.num_warps, arch)
    res.occupancy = res.warps_per_sm / LIMITS[arch].max_warps_per_sm


def _ptxas_spills(ptx: str, arch: int, tmp: str) -> Tuple[Optional[int], Optional[int]]:
    """Exact spill stores / loads in bytes from `ptxas -v` (None where ptxas cannot say)."""
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    out = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "v.cubin")],
                         capture_output=True, text=True)
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr + out.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def occupancy(registers: int, shared: int, num_warps: int, arch: int) -> Tuple[int, str]:
    """Resident warps per SM and what limits them ("regs", "smem", "warps", "blocks")."""
    lim = LIMITS[arch]
    if shared > lim.smem_per_block:
        return 0, "smem"
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by = {  # blocks per SM under each limit (ties name the fixed hardware limit first)
        "warps": lim.max_warps_per_sm // num_warps,
        "blocks": lim.max_blocks_per_sm,
        "regs": (lim.regs_per_sm // regs_per_warp) // num_warps,
        "smem": lim.smem_per_sm // (shared + lim.reserved_smem_per_block),
    }
    limiter = min(by, key=lambda k: by[k])
    return by[limiter] * num_warps, limiter


# --------------------------------------------------------------------------- plans and reports
FULL_ENV = "HOPE_KERNELS_COMPILE_ALL"  # "1": every config of every spec on every arch


def full_sweep() -> bool:
    return os.environ.get(FULL_ENV, "0") == "1"


def configs_for(spec: KernelSpec, arch: int, specs: Sequence[KernelSpec], archs: Sequence[int] = ARCHS,
                full: Optional[bool] = None) -> List[KernelConfig]:
    """The configs of `spec` to compile for sm_<arch>.

    Full sweep: all of them. Otherwise (the default, to keep CI fast on 2 cores) the default
    config on every arch, and the other configs on the newest arch only, for the first spec of
    each kernel function (the other specs of that function differ only in dtype / flags).
    """
    if full is None:
        full = full_sweep()
    if full:
        return list(spec.configs)
    key = _kernel_key(spec)
    representative = next((s for s in specs if _kernel_key(s) == key), spec) is spec
    if arch == max(archs) and representative:
        return list(spec.configs)
    return [c for c in spec.configs if c.default]


def run(specs: Sequence[KernelSpec], archs: Sequence[int] = ARCHS, full: Optional[bool] = None,
        sass: bool = True) -> List[CompileResult]:
    """Compile the planned configs of every spec (SASS checked for default configs when `sass`)."""
    return [compile_config(spec, cfg, arch, sass=sass and cfg.default)
            for spec in specs for arch in archs for cfg in configs_for(spec, arch, specs, archs, full)]


COLUMNS = ("kernel", "arch", "config", "default", "num_warps", "registers", "spill_bytes", "spill_stores",
           "shared_bytes", "warps_per_sm", "occupancy", "limiter", "tensor_cores", "tc_source", "seconds", "error")


def as_row(r: CompileResult) -> Dict[str, object]:
    return {c: (round(getattr(r, c), 3) if isinstance(getattr(r, c), float) else getattr(r, c)) for c in COLUMNS}


def format_table(results: Sequence[CompileResult]) -> str:
    """A fixed-width table, one row per (kernel, arch, config)."""
    head = f"{'kernel':<52} {'sm':>3} {'config':<22} {'regs':>4} {'spill':>6} {'shared':>7} {'occ':>9} {'tc':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        cfg = ("*" if r.default else " ") + r.config
        if r.error:
            lines.append(f"{r.kernel:<52} {r.arch:>3} {cfg:<22} COMPILE ERROR: {r.error}")
            continue
        spill = str(r.spill_bytes) if r.spill_stores is None else f"{r.spill_bytes}!{r.spill_stores}"
        occ = f"{r.warps_per_sm:>2}w {r.occupancy:>4.0%}"
        tc = r.tensor_cores + ("(p)" if r.tc_source == "ptx" and r.tensor_cores != "-" else "")
        lines.append(f"{r.kernel:<52} {r.arch:>3} {cfg:<22} {r.registers:>4} {spill:>6} "
                     f"{r.shared_bytes:>7} {occ:>9} {tc:>10}")
    lines.append("(* default config; regs per thread; spill = local-memory bytes per thread [!spill-store bytes "
                 "from ptxas]; shared = bytes per block; occ = resident warps per SM, of 64; "
                 "tc = tensor-core instructions in the SASS, (p): read from the PTX)")
    return "\n".join(lines)
