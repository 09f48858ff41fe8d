"""Byte-level language modelling on hope.data's embedded default corpus (the Python standard library's
own sources of the running interpreter; nothing downloads). The first `max_bytes` bytes form one token
stream; its last 10% are the validation split (hope.data.TokenStream). Metric: validation bits/byte
on the same validation windows for every variant (hope.runtime.evaluate_loss).
"""
from __future__ import annotations

from functools import lru_cache

from hope.data import TokenStream, read_corpus

VAL_FRACTION = 0.1


@lru_cache(maxsize=4)
def _corpus(max_bytes: int) -> bytes:
    return read_corpus(None, max_bytes)


def lm_stream(seq_len: int, max_bytes: int) -> TokenStream:
    """A fresh stream (position 0) over the first max_bytes of the default corpus."""
    return TokenStream.from_bytes(_corpus(max_bytes), seq_len, VAL_FRACTION, 0)
