"""Ahead-of-time compile check of every Triton kernel for sm_80 / sm_90, with no GPU needed.

Every op folder's `triton_kernels.py` (`hope_kernels.registry.kernel_modules()`) lists its kernels with
`compile_specs()` (see `hope_kernels.aot`). For every
(spec, config, arch) this module runs `triton.compile` for that GPU target and reads off the
cubin, with the `cuobjdump` shipped in the Triton wheel:

- registers per thread and local memory per thread (stack frame + LOCAL, summed over the kernel and
  its non-inlined device functions: register spills in a Triton kernel; when nonzero, `ptxas -v` is
  rerun on the PTX for the exact spill stores/loads of every function),
- shared memory per block (Triton's dynamic shared memory + any static shared memory),
- which tensor-core instructions appear, with their operand type (`HGMMA.BF16`, `HMMA.F16`,
  `HMMA.TF32`, ...): read from the SASS (`cuobjdump -sass`) when `sass=True`, else from the PTX
  (`mma.sync` becomes HMMA, `wgmma` HGMMA; ptxas never creates tensor-core instructions the PTX
  does not ask for). Disassembly costs about a second per kernel, so tests ask for it on default
  configs only,
- an occupancy estimate: resident warps per SM as limited by registers (65536 per SM,
  allocated per warp in units of 256), shared memory (per-SM capacity, 1 KiB reserved per
  block), the 64-warp / 32-block limits, over the 64 warps an SM can hold.

tests/test_compile.py and `python -m tools.compile_report` are built on it. Results are
cached per process (Triton also caches compiled kernels on disk). A process running kernels in
the Triton interpreter (TRITON_INTERPRET=1) cannot compile them itself: it hands the work to a
child process with the interpreter off (`_Server`), transparently.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from hope_kernels import registry
from hope_kernels.aot import KernelConfig, KernelSpec
from hope_kernels.triton_utils import unwrap


KERNEL_MODULES = registry.kernel_modules()   # each op folder's triton_kernels.py
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
    tensor_cores: str = "-"       # MMA instructions with operand type, e.g. "HGMMA.BF16", "HMMA.F16+HMMA.TF32", or "-"
    tc_source: str = ""           # "sass" or "ptx": where tensor_cores was read
    warps_per_sm: int = 0
    occupancy: float = 0.0        # warps_per_sm / max warps per SM
    limiter: str = ""
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def spills(self) -> int:
        """Register-spill bytes (ptxas stores + loads); a stack frame alone (printf, local arrays)
        is not a spill. Falls back to the local-memory size where ptxas could not say."""
        if self.spill_stores is not None:
            return self.spill_stores + (self.spill_loads or 0)
        return self.spill_bytes

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
    Under the interpreter the specs come from the compile server (see `_Server`) and carry no
    kernel function (`fn` is None): compile them with `compile_config`, which goes there too.
    """
    if _interpreting():
        specs, problems = _server().collect(list(modules))
    else:
        specs, problems = _collect_local(modules)
    if strict and problems:
        raise RuntimeError("compile specs incomplete:\n  " + "\n  ".join(problems))
    return specs, problems


def _collect_local(modules: Sequence[str]) -> Tuple[List[KernelSpec], List[str]]:
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
    names = [s.name for s in specs]
    problems += [f"{n}: two specs have this name" for n in sorted({n for n in names if names.count(n) > 1})]
    _SPECS.update({s.name: s for s in specs})
    return specs, problems


_SPECS: Dict[str, KernelSpec] = {}  # by name, for the compile server


def _interpreting() -> bool:
    """True when this process runs Triton kernels in the interpreter: its @triton.jit functions
    (and triton.language's own) are then InterpretedFunctions, which cannot be compiled here."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(spec: KernelSpec) -> KernelConfig:
    return next(c for c in spec.configs if c.default)


def config_label(config: KernelConfig) -> str:
    meta = ",".join(f"{k}={v}" for k, v in config.meta.items())
    regs = f",r{config.maxnreg}" if config.maxnreg else ""
    return f"{meta + ',' if meta else ''}w{config.num_warps},s{config.num_stages}{regs}"


# --------------------------------------------------------------------------- compiling
def kernel_id(spec: KernelSpec) -> str:
    """Which kernel function a spec compiles ("module.name"); specs of one kernel share it."""
    kid = getattr(spec, "kernel_id", None)
    if kid is None:
        try:
            fn = unwrap(spec.fn).fn
            kid = f"{fn.__module__}.{fn.__qualname__}"
        except TypeError:
            kid = spec.name
    return kid


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
        if _interpreting():
            _CACHE[key] = _server().compile(spec.name, spec.configs.index(config), arch, sass)
        else:
            _CACHE[key] = _compile(spec, config, arch, sass)
    return _CACHE[key]


def _compile(spec: KernelSpec, config: KernelConfig, arch: int, sass: bool) -> CompileResult:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    res = CompileResult(spec.name, arch, config_label(config), config.default, config.num_warps)
    t0 = time.perf_counter()
    try:
        fn = unwrap(spec.fn)
        src = triton.compiler.ASTSource(fn=fn, signature=dict(spec.signature),
                                        constexprs={**spec.constexprs, **config.meta},
                                        attrs=_attrs(fn, spec))
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                         "maxnreg": config.maxnreg})
    except Exception as e:  # a compile failure is a result to report (and to fail the test on)
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        res.seconds = time.perf_counter() - t0
        return res
    _measure(res, kernel, arch, sass)
    res.seconds = time.perf_counter() - t0
    return res


def _measure(res: CompileResult, kernel, arch: int, sass: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        fields = _kernel_usage(usage, kernel.metadata.name)
        res.registers = int(fields.get("REG", 0))
        res.spill_bytes = _local_bytes(usage)
        res.shared_bytes = int(kernel.metadata.shared) + int(fields.get("SHARED", 0))
        mma = mma_types(kernel.asm["ptx"], "ptx")
        res.tc_source = "ptx"
        if sass and mma:  # confirm on the machine code (nothing to confirm without mma in the PTX)
            code = subprocess.run([_tool("cuobjdump"), "-sass", cubin],
                                  capture_output=True, text=True, check=True).stdout
            mma = mma_types(code, "sass")
        if sass:
            res.tc_source = "sass"
        res.tensor_cores = "+".join(sorted(mma)) if mma else "-"
        if res.spill_bytes:
            res.spill_stores, res.spill_loads = _ptxas_spills(kernel.asm["ptx"], arch, tmp)
    res.warps_per_sm, res.limiter = occupancy(res.registers, res.shared_bytes, res.num_warps, arch)
    res.occupancy = res.warps_per_sm / LIMITS[arch].max_warps_per_sm


_PTX_TYPES = {"bf16": "BF16", "f16": "F16", "tf32": "TF32", "f32": "TF32", "e4m3": "E4M3", "e5m2": "E5M2",
              "s8": "S8", "u8": "U8", "f64": "F64"}


def mma_types(code: str, kind: str) -> set:
    """Tensor-core instructions with their operand type, e.g. {"HGMMA.BF16", "HMMA.TF32"}.

    SASS spells the operand type after the accumulator (`HMMA.16816.F32.BF16`, `HGMMA.64x64x16.F32.BF16`,
    `HMMA.1688.F32.TF32`); fp16 operands have no suffix (`HMMA.16816.F32`). PTX names the A operand:
    `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, `wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16`.
    """
    found = set()
    if kind == "sass":
        for op, rest in re.findall(r"\b(HGMMA|HMMA)\.([0-9A-Zx.]+)", code):
            parts = rest.split(".")
            operand = next((p for p in parts[2:] if p in ("BF16", "TF32", "F16", "E4M3", "E5M2")), "F16")
            found.add(f"{op}.{operand}")
        return found
    for op, types in re.findall(r"\b(wgmma\.mma_async|mma\.sync)[.\w]*?\.m\d+n\d+k\d+((?:\.\w+)*)", code):
        parts = [p for p in types.split(".") if p]
        dtypes = [p for p in parts if p in _PTX_TYPES]
        operand = _PTX_TYPES[dtypes[1]] if len(dtypes) > 1 else "?"
        found.add(f"{'HGMMA' if op.startswith('wgmma') else 'HMMA'}.{operand}")
    return found


def _kernel_usage(usage: str, name: str) -> Dict[str, str]:
    """REG / STACK / SHARED / LOCAL of the kernel entry in `cuobjdump -res-usage` output (a cubin
    may also hold non-inlined device functions, listed as further Functions)."""
    blocks = re.findall(r"Function (\S+):\s*\n([^\n]*)", usage)
    fields = {f: dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)) for f, line in blocks}
    if name in fields:
        return fields[name]
    return max(fields.values(), key=lambda d: int(d.get("REG", 0)), default={})


def _local_bytes(usage: str) -> int:
    """Local memory per thread (STACK + LOCAL) summed over every function of the cubin: the kernel entry and
    the non-inlined device functions it calls, whose frames and spills are their own."""
    return sum(int(n) for n in re.findall(r"\b(?:STACK|LOCAL):(\d+)", usage))


def _ptxas_spills(ptx: str, arch: int, tmp: str) -> Tuple[Optional[int], Optional[int]]:
    """Exact spill stores / loads in bytes from `ptxas -v`, summed over every function it reports (the
    kernel and its non-inlined device functions; None where ptxas cannot say)."""
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    # the flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py, make_cubin): without them
    # ptxas allocates registers differently and reports spills the kernel Triton builds does not have, or misses
    # some it has
    flags = ["-lineinfo", "--regAllocOptLevel=2"]
    out = subprocess.run([_ptxas(arch), *flags, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "v.cubin")],
                         capture_output=True, text=True)
    return _sum_spills(out.stderr + out.stdout)


def _sum_spills(report: str) -> Tuple[Optional[int], Optional[int]]:
    """(spill stores, spill loads) in bytes summed over the functions of a `ptxas -v` report."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not found:
        return None, None
    return sum(int(a) for a, _ in found), sum(int(b) for _, b in found)


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
# --------------------------------------------------------------------------- compile server
_PREFIX = "@@hope-compile-check "
_SERVER = None


def _server() -> "_Server":
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = _Server()
    return _SERVER


class _Server:
    """A child Python with the interpreter off that collects and compiles specs for this process.

    A process that set TRITON_INTERPRET=1 before importing Triton (the tests' CPU set-up) holds
    only interpreted kernels, and code generation itself misbehaves under that setting; the
    child imports the kernel modules normally. One JSON request per line on stdin, one answer
    per line on stdout (prefixed, so stray prints cannot be mistaken for answers).
    """

    def __init__(self):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.compile_check", "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        atexit.register(self.close)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                answer = json.loads(line[len(_PREFIX):])
                if "error" in answer:
                    raise RuntimeError(f"compile server: {answer['error']}")
                return answer
        self.log.seek(0)
        raise RuntimeError("compile server exited:\n" + self.log.read()[-3000:])

    def collect(self, modules: List[str]) -> Tuple[List[KernelSpec], List[str]]:
        answer = self._ask({"op": "collect", "modules": modules})
        specs = []
        for d in answer["specs"]:
            spec = KernelSpec(d["name"], None, d["signature"], d["constexprs"],
                              [KernelConfig(**c) for c in d["configs"]], d["divisible_by_16"])
            spec.kernel_id = d["kernel_id"]
            specs.append(spec)
        return specs, answer["problems"]

    def compile(self, name: str, config: int, arch: int, sass: bool) -> CompileResult:
        answer = self._ask({"op": "compile", "spec": name, "config": config, "arch": arch, "sass": sass})
        return CompileResult(**answer["result"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _serve() -> None:
    """The child side of `_Server`."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "collect":
                specs, problems = _collect_local(request["modules"])
                answer = {"problems": problems, "specs": [
                    {"name": s.name, "kernel_id": kernel_id(s), "signature": s.signature,
                     "constexprs": s.constexprs, "divisible_by_16": list(getattr(s, "divisible_by_16", []) or []),
                     "configs": [asdict(c) for c in s.configs]} for s in specs]}
            else:
                spec = _SPECS[request["spec"]]
                result = compile_config(spec, spec.configs[request["config"]], request["arch"], request["sass"])
                answer = {"result": asdict(result)}
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(_PREFIX + json.dumps(answer, default=repr) + "\n")
        sys.stdout.flush()


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
    key = kernel_id(spec)
    representative = next((s for s in specs if kernel_id(s) == key), spec) is spec
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


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        from tools import compile_check

        compile_check._serve()
    else:
        sys.exit("usage: python -m tools.compile_report (this module's --serve is internal)")
