"""MQAR, multi-query associative recall (Zoology, Arora et al. 2023): the project's own seeded generator.

Vocabulary (`vocab_size = num_keys + num_values + num_noise`, default 64 + 64 + 16 = 144):

    keys    [0, num_keys)                          distinct within a sequence
    values  [num_keys, num_keys + num_values)      drawn with replacement
    noise   [num_keys + num_values, vocab_size)    fill the gap between the pairs and the queries

A sequence of length T >= 4 N holds N key-value pairs, then the queries:

    k_1 v_1 k_2 v_2 ... k_N v_N | query region of T - 2N tokens

Every key is queried once (the default, num_queries = N) in a random order; a query is the key
followed by its value (teacher forcing: the model sees the answers to earlier queries, as in Zoology).
The query pairs sit at random, non-overlapping even offsets of the query region (consecutive when
T = 4 N, as in the 4-pair, 16-token main setting); the other positions hold noise tokens.
Targets are -100 everywhere except at each query key, where the target is that key's value: the
accuracy is argmax == value over the query positions only (chance 1 / num_values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class MQARTask:
    num_pairs: int = 4
    seq_len: int = 16
    num_keys: int = 64
    num_values: int = 64
    num_noise: int = 16
    num_queries: Optional[int] = None     # None: every key is queried

    def __post_init__(self):
        if self.num_pairs < 1 or self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs must be in [1, num_keys={self.num_keys}], got {self.num_pairs}")
        if self.seq_len < 2 * self.num_pairs + 2 * self.queries:
            raise ValueError(f"seq_len={self.seq_len} cannot hold {self.num_pairs} pairs and {self.queries} "
                             f"queries (need >= {2 * self.num_pairs + 2 * self.queries})")
        if self.queries > self.num_pairs or self.queries < 1:
            raise ValueError(f"num_queries must be in [1, num_pairs], got {self.num_queries}")
        if self.num_noise < 1 and self.seq_len > 2 * self.num_pairs + 2 * self.queries:
            raise ValueError("a query region with gaps needs num_noise >= 1")

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_noise

    def batch(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] long, targets [B, T] long with -100 off the query keys)."""
        B, N, Q, T = batch_size, self.num_pairs, self.queries, self.seq_len
        keys = torch.rand(B, self.num_keys, generator=generator).argsort(dim=1)[:, :N]     # distinct
        values = self.num_keys + torch.randint(0, self.num_values, (B, N), generator=generator)
        tokens = self.num_keys + self.num_values + torch.randint(0, max(self.num_noise, 1), (B, T),
                                                                 generator=generator)
        targets = torch.full((B, T), -100, dtype=torch.long)
        rows = torch.arange(B)[:, None]
        tokens[:, 0:2 * N:2], tokens[:, 1:2 * N:2] = keys, values
        which = torch.rand(B, N, generator=generator).argsort(dim=1)[:, :Q]               # queried pairs, in order
        slots = (T - 2 * N) // 2                                                          # 2-token query slots
        slot = torch.rand(B, slots, generator=generator).argsort(dim=1)[:, :Q].sort(dim=1).values
        pos = 2 * N + 2 * slot                                                            # [B, Q] query key positions
        tokens[rows, pos] = keys.gather(1, which)
        tokens[rows, pos + 1] = values.gather(1, which)
        targets[rows, pos] = values.gather(1, which)
        return tokens, targets


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[int, int]:
    """(correct, counted) over the positions whose target is not -100."""
    mask = targets != -100
    return int((logits.argmax(-1)[mask] == targets[mask]).sum()), int(mask.sum())


def accuracy_by_pair(logits: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, num_pairs: int):
    """(correct [N], counted [N]): accuracy split by the queried key's pair index (0 = the first
    pair, N - 1 = the last, nearest the queries)."""
    return pair_counts(logits.argmax(-1) == targets, tokens, targets, num_pairs)


def pair_counts(right: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, num_pairs: int):
    """accuracy_by_pair from right [B, T] bool (prediction == target)."""
    correct, count = torch.zeros(num_pairs, dtype=torch.long), torch.zeros(num_pairs, dtype=torch.long)
    b, p = (targets != -100).nonzero(as_tuple=True)
    pair = (tokens[b, :2 * num_pairs:2] == tokens[b, p][:, None]).float().argmax(1)
    correct.index_add_(0, pair, right[b, p].long())
    count.index_add_(0, pair, torch.ones_like(pair))
    return correct, count


@dataclass(frozen=True)
class ZoologyMQAR:
    """MQAR as Zoology defines it (Arora et al. 2023, `zoology/data/associative_recall.py`, `_mqar`, with
    the settings of their Figure 2 sweep, `iclr24_zoology_figure2/configs.py`).

    Vocabulary V (8,192): keys [1, V/2), values [V/2, V), token 0 the blank. A sequence of T tokens
    (T even, T >= 4 N):

        k_1 v_1 ... k_N v_N | query region of T - 2N tokens, N query keys, blanks elsewhere

    Keys are distinct within a sequence and so are values (both drawn without replacement). Every key
    is queried exactly once; key i goes to the 2-token slot g_i of the S = (T - 2N) / 2 slots of the
    query region, position 2N + 2 g_i, with the slots g_1..g_N drawn without replacement from
    p(g) ~ (g + 1)^(a - 1), a = power_a = 0.01: a power law that puts most queries near the pairs
    (a = 1 is uniform). The value does not follow its query key (the token after it stays blank). The
    target is the value at each query key's position and -100 elsewhere, so the loss and the accuracy
    count the N answer positions only. With random_non_queries the blanks become uniform random tokens
    of the whole vocabulary (Zoology's default); Figure 2 keeps them 0 (False, the default here).

    Differences from Zoology's pipeline: batches are drawn fresh from the seeded generator every
    step (Zoology draws 100,000 training sequences once and trains 64 epochs over them) and the
    held-out set is 1,024 sequences from a fixed seed (theirs: 3,000); the power law is sampled
    with torch.multinomial (the same sequential draw without replacement as numpy's choice with p).
    """
    num_pairs: int = 4
    seq_len: int = 64
    vocab: int = 8192
    power_a: float = 0.01
    random_non_queries: bool = False

    def __post_init__(self):
        if self.seq_len % 2 or self.seq_len < 4 * self.num_pairs or self.num_pairs < 1:
            raise ValueError(f"seq_len must be even and >= 4 * num_pairs (num_pairs >= 1), got seq_len="
                             f"{self.seq_len}, num_pairs={self.num_pairs}")
        if self.vocab <= self.seq_len or self.vocab // 2 - 1 < self.num_pairs:
            raise ValueError(f"vocab must exceed seq_len={self.seq_len} and hold num_pairs={self.num_pairs} "
                             f"keys in [1, vocab/2), got {self.vocab}")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def num_keys(self) -> int:
        return self.vocab // 2

    def batch(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] long, targets [B, T] long with -100 off the query keys)."""
        B, N, T, half = batch_size, self.num_pairs, self.seq_len, self.vocab // 2
        keys = 1 + torch.rand(B, half - 1, generator=generator).topk(N, dim=1).indices       # distinct
        values = half + torch.rand(B, self.vocab - half, generator=generator).topk(N, dim=1).indices
        slots = (T - 2 * N) // 2
        p = torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        gaps = torch.multinomial(p.expand(B, slots), N, replacement=False, generator=generator)
        tokens = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        tokens[:, 0:2 * N:2], tokens[:, 1:2 * N:2] = keys, values
        rows, pos = torch.arange(B)[:, None], 2 * N + 2 * gaps
        tokens[rows, pos] = keys
        targets[rows, pos] = values
        if self.random_non_queries:
            noise = torch.randint(0, self.vocab, (B, T), generator=generator)
            tokens = torch.where(tokens == 0, noise, tokens)
        return tokens, targets


def make_task(kind: str, args: dict):
    """The task of a job: "mqar" -> MQARTask(**args), "zoology" -> ZoologyMQAR(**args)."""
    if kind == "zoology":
        return ZoologyMQAR(**args)
    if kind == "mqar":
        return MQARTask(**args)
    raise ValueError(f"task kind must be 'mqar' or 'zoology', got {kind!r}")
