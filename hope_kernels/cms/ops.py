# PLACEHOLDER until the kernels land: delegates to the references (replaced by the CMS work).
from .. import reference


def cms_scan(q, k, v, decay, mix=None, scale=None, *, initial_state=None, output_final_state=False,
             cu_seqlens=None, chunk_size=64, backend=None):
    return reference.cms_scan(q, k, v, decay, mix, scale, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def cms_step(q, k, v, decay, state, mix=None, scale=None, *, backend=None):
    return reference.cms_step(q, k, v, decay, state, mix, scale)
