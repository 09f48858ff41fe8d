"""Sampling helpers and the per-layer generation cache."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class HOPECache:
    """Per-layer generation state: one dict per block (KV cache or recurrent states) and the length so far."""

    layers: List[dict] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "HOPECache":
        return cls([{} for _ in range(num_layers)], 0)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_sampling(temperature, top_k=None, top_p=None) -> None:
    """temperature: a finite number >= 0; top_k: None or an integer >= 1; top_p: None or in (0, 1]."""
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and not _is_int(top_k):
        raise TypeError(f"top_k must be an integer or None, got {top_k!r}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if top_p is not None and not _is_real(top_p):
        raise TypeError(f"top_p must be a number or None, got {top_p!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def check_max_new_tokens(max_new_tokens) -> None:
    if not _is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, vocab]. temperature 0 is greedy (argmax).

    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability reaches p
    (nucleus sampling; the most likely token is always kept).
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p   # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
