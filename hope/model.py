"""HOPE: a decoder-only language model of HOPE blocks (attention -> CMS -> MLP by default), with cached generation.

    from hope import HOPE, HOPEConfig
    model = HOPE(vocab_size=32000, dim=512, num_layers=12, num_heads=8, num_memory_modules=5)
    logits, loss = model(tokens, targets)        # loss is None without targets
    out = model.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=None)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import HOPEBlock
from .checkpoint import upgrade_model_config
from .config import HOPEConfig
from .generation import HOPECache, check_max_new_tokens, check_sampling, sample_next
from .layers import Embeddings, RMSNorm
from .ops import check_backend


class HOPE(nn.Module):
    """HOPE(config) or HOPE(**fields of HOPEConfig) (or both: keywords override the config; keywords of
    an earlier vocabulary, e.g. use_cms, are read through hope.checkpoint.upgrade_model_config).
    `backend` (None | "triton" | "torch" | "reference") is the layers' ops, a run-time choice that
    set_backend changes; it is not part of the config."""

    def __init__(self, config: Optional[HOPEConfig] = None, *, backend: Optional[str] = None, **kwargs):
        super().__init__()
        if config is None:
            config = HOPEConfig.from_dict(kwargs)
        elif not isinstance(config, HOPEConfig):
            raise TypeError(f"config must be a HOPEConfig, got {type(config).__name__}")
        elif kwargs:
            config = HOPEConfig.from_dict({**config.to_dict(), **upgrade_model_config(kwargs)})
        self.config = c = config
        self.backend = check_backend(backend)
        self.embed = Embeddings(c.vocab_size, c.dim, c.max_seq_len, c.position, c.dropout)
        self.blocks = nn.ModuleList(HOPEBlock(c, backend) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_weights:
            self.head.weight = self.embed.tok.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 style: N(0, init_std) weights, zero biases; residual output projections get
        init_std / sqrt(number of residual branches) so the residual stream keeps unit scale."""
        c = self.config
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = c.init_std
            if getattr(module, "residual_branch", False):
                std = std / math.sqrt(c.residual_branches * c.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ basics
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters (tied weights counted once); non_embedding drops the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.tok.weight.numel()
            if self.embed.pos is not None:
                n -= self.embed.pos.weight.numel()
            if not self.config.tie_weights:
                n -= self.head.weight.numel()
        return n

    def set_backend(self, backend: Optional[str]) -> "HOPE":
        """Run every layer on `backend` (None | "triton" | "torch" | "reference"); same weights."""
        self.backend = check_backend(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def new_cache(self) -> HOPECache:
        return HOPECache.empty(len(self.blocks))

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache: Optional[HOPECache] = None):
        """tokens: [B, T] int -> (logits [B, T, vocab], loss or None).

        targets [B, T] (-100 = ignored) gives the mean cross entropy. With `cache` the tokens
        continue the cached sequence and the cache is updated in place (generation).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor [B, T], got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"tokens must hold integer token ids, got {tokens.dtype}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one token per row, got shape {tuple(tokens.shape)}")
        if not torch.compiler.is_compiling():   # one host sync; out-of-range ids would index garbage
            V = self.config.vocab_size
            if bool(((tokens < 0) | (tokens >= V)).any()):
                raise ValueError(f"tokens must be ids in [0, vocab_size={V}), got values in "
                                 f"[{tokens.min().item()}, {tokens.max().item()}]")
            if targets is not None and bool((((targets < 0) & (targets != -100)) | (targets >= V)).any()):
                raise ValueError(f"targets must be ids in [0, vocab_size={V}) or -100 (ignored), got values in "
                                 f"[{targets.min().item()}, {targets.max().item()}]")
        offset = cache.length if cache is not None else 0
        x = self.embed(tokens, offset)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tokens.shape[1]
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, "
                                 f"got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]],
                 max_new_tokens: int = 50, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue `prompt` ([T] or [B, T] token ids, or lists of equal length) by up to max_new_tokens.

        temperature 0 is greedy. With use_cache each new token runs only the new position through
        the model (KV cache for softmax attention, linear_attention_step / cms_step states for the
        recurrent parts); use_cache=False re-runs the whole prefix every step (same tokens).
        A sequence that emits eos_token_id is padded with it; generation stops when all have.
        Returns the prompt followed by the new tokens, with the prompt's rank.
        """
        device = next(self.parameters()).device
        if isinstance(prompt, (str, bytes)):
            raise TypeError(f"prompt must hold token ids (a tensor or a list of ints), got {type(prompt).__name__}: "
                            "encode text first (e.g. hope.data.ByteTokenizer().encode)")
        check_max_new_tokens(max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        if not isinstance(prompt, torch.Tensor):
            flat = len(prompt) == 0 or not isinstance(prompt[0], (list, tuple, torch.Tensor))
            rows = [list(prompt)] if flat else [list(r) for r in prompt]
            if len({len(r) for r in rows}) != 1:
                raise ValueError("prompts of one batch must have the same length")
            prompt = torch.tensor(rows[0] if flat else rows)
            if prompt.numel() == 0:
                prompt = prompt.long()
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise TypeError(f"prompt must hold integer token ids, got {prompt.dtype}")
        squeeze = prompt.dim() == 1
        seq = (prompt[None] if squeeze else prompt).to(device=device, dtype=torch.long)
        if seq.dim() != 2 or seq.shape[0] == 0 or seq.shape[1] == 0:
            raise ValueError(f"prompt must hold at least one token, shape [T] or [B, T]; got {tuple(prompt.shape)}")
        need = seq.shape[1] + max(max_new_tokens - 1, 0)    # the last new token is not fed back
        if self.config.position == "learned" and need > self.config.max_seq_len:
            raise ValueError(f"prompt length {seq.shape[1]} with max_new_tokens={max_new_tokens} needs {need} "
                             f"positions, more than max_seq_len={self.config.max_seq_len} (learned positions)")
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache() if use_cache else None
            logits = self(seq, cache=cache)[0][:, -1]
            done = torch.zeros(seq.shape[0], dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if (eos_token_id is not None and bool(done.all())) or i == max_new_tokens - 1:
                    break
                if use_cache:
                    logits = self(nxt[:, None], cache=cache)[0][:, -1]
                else:
                    logits = self(seq)[0][:, -1]
        finally:
            self.train(was_training)
        return seq[0] if squeeze else seq
