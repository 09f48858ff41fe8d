"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed).

One test per (kernel spec, arch), so pytest-xdist spreads the compiles. Each prints its rows of
the compile report (`pytest -s` shows them): registers, local-memory spills, shared memory,
occupancy, tensor-core instructions with their operand type. A default config must not spill (beyond the
bounds in KNOWN_SPILLS) and must fit the shared-memory limit of the arch; every compiled config must compile; a kernel with
bf16 / fp16 inputs must run its dots in that precision (no TF32 MMA, which halves the rate).

To keep CI fast on 2 cores, non-default configs are compiled for sm_90 only and for one spec
per kernel function; HOPE_KERNELS_COMPILE_ALL=1 compiles every config of every spec on both.
"""
import pytest

from tools import compile_check as cc

SPECS, PROBLEMS = cc.collect_specs(cc.KERNEL_MODULES, strict=False)
# Default configs that still spill, measured with Triton's own ptxas flags: (spec, arch) -> spill stores + loads in
# bytes per thread, over all functions of the cubin. A bound that may only go down; every other default config
# must not spill.
KNOWN_SPILLS = {
    ("cms.bwd[K=128,V=128,M=4,fp16,mix=token]", 90): 24,
}


def test_every_kernel_module_has_compile_specs():
    """A listed kernel module that is missing, fails to import or lists no kernels is a failure."""
    assert not PROBLEMS, "\n".join(PROBLEMS)


@pytest.mark.parametrize("arch", cc.ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles(spec, arch):
    configs = cc.configs_for(spec, arch, SPECS)
    results = [cc.compile_config(spec, c, arch, sass=c.default) for c in configs]
    print("\n" + cc.format_table(results))
    failed = [f"{r.config}: {r.error}" for r in results if r.error]
    assert not failed, f"{spec.name} does not compile for sm_{arch}:\n" + "\n".join(failed)
    (default,) = [r for r in results if r.default]
    limit = cc.LIMITS[arch].smem_per_block
    assert default.spills <= KNOWN_SPILLS.get((spec.name, arch), 0), (
        f"{spec.name} default config {default.config} spills registers on sm_{arch}: {default.spill_stores} bytes "
        f"of spill stores, {default.spill_loads} of loads, {default.spill_bytes} bytes of local memory per thread, "
        f"{default.registers} registers")
    assert not (_low_precision(spec) and "TF32" in default.tensor_cores), (
        f"{spec.name} has 16-bit inputs but its default config runs TF32 MMA on sm_{arch} ({default.tensor_cores}): "
        "feed tl.dot the input dtype (fp32 intermediates cast down first)")
    assert default.fits_shared, (
        f"{spec.name} default config {default.config} needs {default.shared_bytes} bytes of shared memory, "
        f"more than the {limit} of sm_{arch}")


def _low_precision(spec) -> bool:
    return any(t in ("*bf16", "*fp16") for t in spec.signature.values())


def test_mma_operand_types():
    """The tensor-core column names the operand type, read from SASS or PTX."""
    sass = "HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ ;\n HMMA.16816.F32 R4, R8, R12, R4 ;\n HMMA.1688.F32.TF32 R0"
    assert cc.mma_types(sass, "sass") == {"HGMMA.BF16", "HMMA.F16", "HMMA.TF32"}
    ptx = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
           "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, p, 1, 1;")
    assert cc.mma_types(ptx, "ptx") == {"HMMA.BF16", "HGMMA.TF32"}
    assert cc.mma_types("add.f32 %f1, %f2, %f3;", "ptx") == set()


def test_occupancy_model():
    """The occupancy estimate against hand-computed cases of the CUDA occupancy rules."""
    # 32 registers, 4 warps, no shared memory: 64 warps (the warp limit).
    assert cc.occupancy(32, 0, 4, 90) == (64, "warps")
    # 128 registers: 4096 per warp, 16 warps fit the 65536-register file.
    assert cc.occupancy(128, 0, 4, 90) == (16, "regs")
    # 255 registers round up to 256 per thread: 8 warps.
    assert cc.occupancy(255, 0, 4, 80) == (8, "regs")
    # 100 KiB of shared memory per block: one block of 4 warps on sm_80, two on sm_90.
    assert cc.occupancy(32, 100 * 1024, 4, 80) == (4, "smem")
    assert cc.occupancy(32, 100 * 1024, 4, 90) == (8, "smem")
    # Over the opt-in per-block limit: no block fits.
    assert cc.occupancy(32, cc.LIMITS[80].smem_per_block + 1, 4, 80) == (0, "smem")


def test_resource_usage_parsing():
    """The kernel's own entry is read, not a non-inlined helper listed next to it."""
    usage = ("Resource usage:\n Common:\n  GLOBAL:0\n"
             " Function helper:\n  REG:200 STACK:64 SHARED:0 LOCAL:0 CONSTANT[0]:8\n"
             " Function my_kernel:\n  REG:40 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:400\n")
    assert cc._kernel_usage(usage, "my_kernel") == {"REG": "40", "STACK": "0", "SHARED": "1024", "LOCAL": "0"}
    # local memory counts every function: a spill in a non-inlined helper is the kernel's spill
    assert cc._local_bytes(usage) == 64
    ptxas = ("ptxas info    : Function properties for helper\n    8 bytes stack frame, 24 bytes spill stores, "
             "16 bytes spill loads\nptxas info    : Function properties for my_kernel\n    0 bytes stack frame, "
             "4 bytes spill stores, 4 bytes spill loads\n")
    assert cc._sum_spills(ptxas) == (28, 20)
    assert cc._sum_spills("no spill lines") == (None, None)
