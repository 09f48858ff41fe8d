"""The "triton" backend of cms_scan / cms_step: launchers and the autograd.Function around the kernels.

Inputs arrive validated and contiguous from ops.py: tau [H, M], mix None / [H, M] / [B, T, H, M].
"""
from __future__ import annotations

import torch
import triton

from .triton_kernels import (BWD_BV, cms_bwd_aux_kernel, cms_bwd_dh_kernel, cms_bwd_kernel, cms_fwd_kernel,
                             cms_step_kernel)


def _block(n: int) -> int:
    """Padded tile size of a head dimension: a power of two >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


def chunk_tile(chunk_size: int, K: int, V: int) -> int:
    """The kernels' chunk length. 16: the gradient kernel holds full-K chunk tiles, the dq/dk
    accumulators and two K x BV states in registers, and larger chunks spill there (see the
    compile report). chunk_size only matters to the torch backend; the result does not depend on it."""
    return 16


def _chunk_offsets(cu_seqlens, BT: int):
    """Index of each sequence's first chunk in the chunk-state buffer (computed on the device)."""
    if cu_seqlens is None:
        return None
    n_chunks = torch.div(cu_seqlens[1:] - cu_seqlens[:-1] + BT - 1, BT, rounding_mode="floor")
    return torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])


def _forward(q, k, v, tau, mix, scale, h0, cu_seqlens, BT, save_states):
    B, T, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    offsets = _chunk_offsets(cu_seqlens, BT)
    # Upper bound on the chunk count without a host sync: each sequence adds at most one partial chunk.
    n_chunks = B * triton.cdiv(T, BT) if cu_seqlens is None else triton.cdiv(T, BT) + N
    o_shape = (B, T, H, V) if mix is not None else (B, T, H, M, V)
    o = torch.empty(o_shape, dtype=q.dtype, device=q.device)
    ht = torch.empty(N, H, M, K, V, dtype=torch.float32, device=q.device)
    hs = torch.empty(n_chunks, H, M, K, V, dtype=torch.float32, device=q.device) if save_states else None
    BK = _block(K)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    cms_fwd_kernel[grid](q, k, v, tau, mix, o, h0, ht, hs, cu_seqlens, offsets, scale, T,
                         H=H, M=M, K=K, V=V, BT=BT, BK=BK,
                         MIX_PER_TOKEN=mix is not None and mix.dim() == 4)
    return o, ht, hs


class CmsScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tau, mix, h0, scale, output_final_state, cu_seqlens, BT):
        ctx.set_materialize_grads(False)
        save = any(ctx.needs_input_grad[:6])
        o, ht, hs = _forward(q, k, v, tau, mix, scale, h0, cu_seqlens, BT, save)
        ctx.save_for_backward(q, k, v, tau, mix, hs, ht, cu_seqlens)
        ctx.scale, ctx.BT = scale, BT
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, tau, mix, hs, ht, cu_seqlens = ctx.saved_tensors
        B, T, H, K = q.shape
        V, M = v.shape[-1], tau.shape[-1]
        N = ht.shape[0]
        BT = ctx.BT
        offsets = _chunk_offsets(cu_seqlens, BT)
        f32 = dict(dtype=torch.float32, device=q.device)
        BV = min(BWD_BV, _block(V))
        NV = triton.cdiv(V, BV)
        dq, dk = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
        dv = torch.empty(B, T, H, V, **f32)
        dh0 = torch.empty(N, H, M, K, V, **f32)
        dhs = torch.empty_like(hs)              # dL/dS at the end of every chunk
        need_mix = mix is not None and ctx.needs_input_grad[4]
        dmix = torch.empty(NV, B, T, H, M, **f32) if need_mix else None
        need_decay = ctx.needs_input_grad[3]
        # per-chunk partials; zero-filled since packed sequences leave some of the NS slots unused
        dgs = torch.zeros(NV, hs.shape[0], H, M, 2, **f32) if need_decay else None
        if do is None:   # only the final state was used
            do = q.new_zeros((B, T, H, V) if mix is not None else (B, T, H, M, V))
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        mix_per_token = mix is not None and mix.dim() == 4
        cms_bwd_dh_kernel[(NV, N * H, M)](q, tau, mix, do, dht, dh0, dhs, cu_seqlens, offsets, ctx.scale, T,
                                          H=H, M=M, K=K, V=V, BT=BT, BK=_block(K), BV=BV,
                                          MIX_PER_TOKEN=mix_per_token)
        # every sequence has at most cdiv(T, BT) chunks; programs past their sequence's end exit
        grid = (triton.cdiv(T, BT), NV, N * H)
        cms_bwd_kernel[grid](q, k, v, tau, mix, do, hs, dhs, dq, dk, dv, cu_seqlens, offsets, ctx.scale, T, B * T,
                             H=H, M=M, K=K, V=V, BT=BT, BK=_block(K), BV=BV, MIX_PER_TOKEN=mix_per_token)
        if need_mix or need_decay:
            cms_bwd_aux_kernel[grid](q, k, v, tau, mix, do, hs, dhs, dmix, dgs, cu_seqlens, offsets, ctx.scale, T,
                                     B * T, hs.shape[0], H=H, M=M, K=K, V=V, BT=BT, BK=_block(K), BV=BV,
                                     MIX_PER_TOKEN=mix_per_token)
        dq, dk = dq.sum(0), dk.sum(0)
        dmix = None if dmix is None else dmix.sum(0)
        dtau = None
        if need_decay:
            dg, kdk = dgs.sum(0).unbind(-1)                                  # [NS, H, M]
            tf = tau.to(torch.float32)
            dtau = (dg / tf - kdk).sum(0).to(tau.dtype)
        dmix_out = None
        if need_mix:
            dmix_out = (dmix if mix.dim() == 4 else dmix.sum((0, 1))).to(mix.dtype)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtau, dmix_out,
                dh0 if ctx.needs_input_grad[5] else None, None, None, None, None)


def cms_scan_triton(q, k, v, tau, mix, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
    K, V = q.shape[-1], v.shape[-1]
    BT = chunk_tile(chunk_size, K, V)
    mix = None if mix is None else mix.contiguous()
    tau = tau.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = CmsScanFunction.apply(q, k, v, tau, mix, h0, scale, output_final_state, cu_seqlens, BT)
    return o, (ht if output_final_state else None)


def cms_step_triton(q, k, v, tau, state, mix, scale):
    B, H, K = q.shape
    V, M = v.shape[-1], tau.shape[-1]
    q, k, v, tau = (t.contiguous() for t in (q, k, v, tau))
    mix = None if mix is None else mix.contiguous()
    o = torch.empty((B, H, V) if mix is not None else (B, H, M, V), dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), B * H)
    cms_step_kernel[grid](q, k, v, tau, mix, state, o, scale, H=H, M=M, K=K, V=V, BK=_block(K),
                          MIX_PER_BATCH=mix is not None and mix.dim() == 3)
    return o, state
