# PLACEHOLDER until the kernels land: delegates to the references (replaced by the linear-attention work).
from .. import reference


def linear_attention(q, k, v, scale=None, *, causal=True, normalize=False, eps=1e-6, initial_state=None,
                     output_final_state=False, cu_seqlens=None, chunk_size=64, backend=None):
    return reference.linear_attention(q, k, v, scale, causal=causal, normalize=normalize, eps=eps,
                                      initial_state=initial_state, output_final_state=output_final_state,
                                      cu_seqlens=cu_seqlens)


def linear_attention_step(q, k, v, state, scale=None, *, normalize=False, eps=1e-6, backend=None):
    return reference.linear_attention_step(q, k, v, state, scale, normalize=normalize, eps=eps)
