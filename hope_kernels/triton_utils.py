"""What every Triton kernel module shares: autotuning, the dtype dots run in, poisoned outputs, packed sequences.

- `autotune(configs, key, restore=...)`: one `triton.autotune` rule for every kernel. `configs` is the
  kernel's list of `aot.KernelConfig` (the same list its compile specs use; the one marked default runs
  under the interpreter and with HOPE_KERNELS_AUTOTUNE=0). A kernel that writes one of its inputs
  (an in-place step) names it in `restore`: the autotuner saves it before each timed run and restores it
  after, so tuning never applies an update twice.
- `upcast_dots(dtype)`: the value of the kernels' `UPCAST` constexpr. On a GPU, bf16/fp16 tiles go into
  `tl.dot` as they are (tensor cores, fp32 accumulation) and fp32 intermediates are cast to the input
  dtype before they feed a dot. The Triton interpreter computes bf16 dots on raw bits, so there (only)
  bf16 tiles are upcast to fp32 after loading; fp16 needs no upcast and tests the low-precision path.
- `empty(...)`: kernel outputs, NaN-filled under the interpreter or HOPE_KERNELS_POISON=1.
- `kernel_spec(...)`: a kernel's AOT compile description (`aot.KernelSpec`) from its pointer dtypes.
- `chunk_indices(cu_seqlens, BT)`: the (sequence, chunk) pair of every real chunk of a packed batch, so
  chunk-parallel kernels launch one program per real chunk; grids put that count on axis 0 (limit
  2^31 - 1), never on axes 1 / 2 (limit 65535).
- `unit_lower_inverse(A, BT)`: (I + A)^-1 of a strictly lower triangular [BT, BT] tile (the WY factors of
  delta-rule chunks).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Set

import torch
import triton
import triton.language as tl

from .aot import KernelConfig, KernelSpec
from .utils import autotune_enabled, interpreter_enabled

POISON_ENV = "HOPE_KERNELS_POISON"  # "1": fill kernel outputs with NaN before launch (always on in the interpreter)
GRID_YZ_LIMIT = 65535                 # CUDA's limit on grid axes 1 and 2


def default_config(configs: Sequence[KernelConfig]) -> KernelConfig:
    (default,) = [c for c in configs if c.default]
    return default


def triton_configs(configs: Sequence[KernelConfig]) -> List[triton.Config]:
    """Every config on a GPU with autotuning on; the default alone under the interpreter or AUTOTUNE=0."""
    as_triton = lambda c: triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages,
                                       maxnreg=c.maxnreg)
    chosen = configs if autotune_enabled() else [default_config(configs)]
    return [as_triton(c) for c in chosen]


def autotune(configs: Sequence[KernelConfig], key: Iterable[str], restore: Iterable[str] = ()):
    """`triton.autotune` over `configs`; `restore` names the inputs the kernel writes in place.

    Our own save/restore hooks rather than `restore_value`: they skip inputs passed as None (optional
    states), which Triton releases differ on.
    """
    restore, saved = list(restore), {}

    def save(kwargs, reset_only=False):
        if not reset_only:
            saved.update({n: kwargs[n].clone() for n in restore if kwargs.get(n) is not None})

    def put_back(kwargs, exception=None):
        for n, t in saved.items():
            kwargs[n].copy_(t)
        saved.clear()

    hooks = dict(pre_hook=save, post_hook=put_back) if restore else {}
    return triton.autotune(configs=triton_configs(configs), key=list(key), **hooks)


def upcast_dots(dtype: torch.dtype) -> bool:
    """True only where bf16 tiles must become fp32 before tl.dot: bf16 inputs under the interpreter."""
    return dtype == torch.bfloat16 and interpreter_enabled()


@triton.jit
def load_tile(ptrs, mask, UPCAST: tl.constexpr):
    """A tile in the input dtype (fp32 where UPCAST), zero where masked: ready to feed tl.dot."""
    x = tl.load(ptrs, mask=mask, other=0.)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def seq_bounds(i_n, T, cu_seqlens, chunk_offs, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(first token as int64, length, index of its first chunk in per-chunk buffers) of sequence i_n."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        return bos, (eos - bos).to(tl.int32), tl.load(chunk_offs + i_n).to(tl.int64)
    else:
        return i_n.to(tl.int64) * T, T, i_n.to(tl.int64) * tl.cdiv(T, BT)


@triton.jit
def state_tile(x, i_nh, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                LOAD: tl.constexpr):
    """Index vectors and masks of the program's [BK, BV] state tile, and the tile of x[i_nh] in float32
    (zeros unless LOAD): the prologue of the sequential chunk-state passes."""
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    off_kv = o_k[:, None] * V + o_v[None, :]
    b_x = tl.zeros([BK, BV], dtype=tl.float32)
    if LOAD:
        b_x = tl.load(x + i_nh.to(tl.int64) * K * V + off_kv, mask=m_kv, other=0.)
    return o_k, o_v, m_k, m_v, m_kv, off_kv, b_x


@triton.jit
def chunk_bounds(i_c, T, cu_seqlens, chunk_idx, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, first token as int64, rows) of the i_c-th real chunk of the batch (see chunk_indices)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_idx + 2 * i_c)
        i_t = tl.load(chunk_idx + 2 * i_c + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        NC = tl.cdiv(T, BT)
        i_n, i_t = i_c // NC, i_c % NC
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    t0 = bos + i_t.to(tl.int64) * BT
    return i_n, t0, tl.minimum(eos - t0, BT).to(tl.int32)


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer; NaN-filled under the interpreter (or HOPE_KERNELS_POISON=1) so unwritten elements show."""
    if interpreter_enabled() or os.environ.get(POISON_ENV, "0") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def host_lengths(lengths: torch.Tensor) -> list:
    """The packed sequences' lengths (or chunk counts) on the host: the one sync a launch grid over the real
    chunks of a packed batch needs. A CUDA graph capture cannot make it: RuntimeError then."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("cu_seqlens: the chunk count of a packed batch is read on the host, which cannot "
                           "happen while capturing a CUDA graph; capture a padded batch or run packed ones eagerly")
    return lengths.tolist()


def chunk_indices(cu_seqlens: Optional[torch.Tensor], BT: int) -> Optional[torch.Tensor]:
    """[NT, 2] int32 (sequence, chunk within the sequence) of every real chunk of a packed batch.

    Computed on the host from the offsets (one small sync; ops already read cu_seqlens to validate it).
    """
    if cu_seqlens is None:
        return None
    lens = host_lengths(cu_seqlens[1:] - cu_seqlens[:-1])
    pairs = [(n, c) for n, L in enumerate(lens) for c in range(triton.cdiv(L, BT))]
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.int32, device=cu_seqlens.device)
    return torch.tensor(pairs, dtype=torch.int32, device=cu_seqlens.device)


def chunk_offsets(cu_seqlens: Optional[torch.Tensor], BT: int) -> Optional[torch.Tensor]:
    """[N + 1] int64: index of each packed sequence's first chunk in a per-chunk buffer."""
    if cu_seqlens is None:
        return None
    n_chunks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1, BT, rounding_mode="floor")
    return torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)]).to(torch.int64)


def check_grid(grid: Sequence[int]) -> tuple:
    """A launch grid, after checking axes 1 and 2 against CUDA's 65535 limit (axis 0 takes 2^31 - 1)."""
    grid = tuple(int(g) for g in grid)
    if grid[0] >= 2 ** 31 or any(g > GRID_YZ_LIMIT for g in grid[1:]):
        raise ValueError(f"launch grid {grid} exceeds the CUDA grid limits (2^31 - 1, 65535, 65535)")
    return grid


def unwrap(fn):
    """The raw JITFunction under any triton.autotune / triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    for _ in range(16):
        if isinstance(fn, JITFunction):
            return fn
        if not hasattr(fn, "fn"):
            break
        fn = fn.fn
    raise TypeError(f"{fn!r} is not a Triton kernel (@triton.jit)")


def kernel_spec(name: str, kernel, configs: Sequence[KernelConfig], pointers: Dict[str, str], present: Set[str],
                scalars: Dict[str, str], constexprs: Dict[str, object]) -> KernelSpec:
    """A KernelSpec: `pointers` maps argument -> dtype ("bf16", "fp32", "i64"), those not in `present`
    are passed as None (optional inputs); `scalars` maps argument -> type ("i32", "fp32")."""
    signature = {p: (f"*{dt}" if p in present else "constexpr") for p, dt in pointers.items()}
    signature.update(scalars)
    signature.update({c: "constexpr" for c in constexprs})
    fixed = {p: None for p in pointers if p not in present}
    fixed.update(constexprs)
    return KernelSpec(name, unwrap(kernel), signature, fixed, list(configs),
                      divisible_by_16=["T"] if "T" in scalars else [])


@triton.jit
def unit_lower_inverse(A, BT: tl.constexpr):
    """(I + A)^-1 of a strictly lower triangular [BT, BT] float32 tile, by forward substitution row by row:
    with N = (I + A)^-1 - I, row i of N is -A_i - sum_{l < i} A_il N_l."""
    o = tl.arange(0, BT)
    b_n = -A
    for i in range(1, BT):
        sel = o == i
        b_row = tl.sum(tl.where(sel[:, None], b_n, 0.), 0)
        b_row = b_row + tl.sum(b_row[:, None] * b_n, 0) * (o < i)
        b_n = tl.where(sel[:, None], b_row[None, :], b_n)
    return b_n + tl.where(o[:, None] == o[None, :], 1., 0.)
