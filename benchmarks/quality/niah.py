"""Needle retrieval past the training length: a key-value needle hidden in filler, asked for at the end.

Tokens (`vocab_size = num_keys + num_values + num_filler`, default 32 + 32 + 64 = 128):

    keys    [0, num_keys)                          distinct within a sequence
    values  [num_keys, num_keys + num_values)      drawn with replacement
    filler  [num_keys + num_values, vocab_size)    uniform random haystack

A sequence of length T holds `num_needles` pairs "k v" at random 2-token slots 2s, s in
[0, (T - 1) // 2) (non-overlapping), filler everywhere else, and ends with one needle's key; the only
target is at that last position: the needle's value (chance 1 / num_values). With several needles the
asked one is uniform among them. Its depth is its slot's position over the sequence, 2s / (T - 1) in [0, 1).

A token vocabulary, not bytes: the filler, the keys and the values are disjoint, so the task isolates
retrieval at a distance (a byte-level needle would first need byte words and a tokenizer-free notion
of a key, and its filler text would leak the answer's statistics); it is the MQAR vocabulary split with
one query at the end instead of N in a query region.

Models train at T_train and are evaluated, unchanged, on fixed held-out sets at T_train, 4 T_train and
16 T_train (`eval_lengths`), reporting accuracy per length and per needle depth bin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .train import Budget, device_of, fit

EVAL_SEED = 4321
DEPTH_BINS = 5


@dataclass(frozen=True)
class NeedleTask:
    seq_len: int = 64
    num_needles: int = 1
    num_keys: int = 32
    num_values: int = 32
    num_filler: int = 64

    def __post_init__(self):
        if self.num_needles < 1 or self.num_needles > self.num_keys:
            raise ValueError(f"num_needles must be in [1, num_keys={self.num_keys}], got {self.num_needles}")
        if (self.seq_len - 1) // 2 < self.num_needles:
            raise ValueError(f"seq_len={self.seq_len} cannot hold {self.num_needles} needles and the query "
                             f"(need >= {2 * self.num_needles + 1})")
        if self.num_filler < 1:
            raise ValueError(f"num_filler must be >= 1, got {self.num_filler}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    def at_length(self, seq_len: int) -> "NeedleTask":
        return NeedleTask(seq_len, self.num_needles, self.num_keys, self.num_values, self.num_filler)

    def batch(self, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [B, T] long, targets [B, T] long, -100 but at the last position, depth [B] float)."""
        B, n, T, K, V = batch_size, self.num_needles, self.seq_len, self.num_keys, self.num_values
        tokens = K + V + torch.randint(0, self.num_filler, (B, T), generator=generator)
        keys = torch.rand(B, K, generator=generator).topk(n, dim=1).indices
        values = K + torch.randint(0, V, (B, n), generator=generator)
        slot = torch.rand(B, (T - 1) // 2, generator=generator).topk(n, dim=1).indices
        rows = torch.arange(B)[:, None]
        tokens[rows, 2 * slot], tokens[rows, 2 * slot + 1] = keys, values
        asked = torch.randint(0, n, (B, 1), generator=generator)
        tokens[:, -1] = keys.gather(1, asked)[:, 0]
        targets = torch.full((B, T), -100, dtype=torch.long)
        targets[:, -1] = values.gather(1, asked)[:, 0]
        depth = 2 * slot.gather(1, asked)[:, 0].double() / (T - 1)
        return tokens, targets, depth


@torch.no_grad()
def needle_accuracy(model: torch.nn.Module, task: NeedleTask, size: int, batch: int = 64) -> dict:
    """Accuracy on `size` held-out sequences of `task` (fixed seed) and per depth bin
    [i / DEPTH_BINS, (i + 1) / DEPTH_BINS)."""
    tokens, targets, depth = task.batch(size, torch.Generator().manual_seed(EVAL_SEED + task.seq_len))
    was = model.training
    model.eval()
    right = []
    for i in range(0, size, batch):
        logits, _ = model(tokens[i:i + batch].to(device_of(model)))
        right.append(logits[:, -1].argmax(-1).cpu() == targets[i:i + batch, -1])
    model.train(was)
    right = torch.cat(right).double()
    bins = (depth * DEPTH_BINS).long().clamp(max=DEPTH_BINS - 1)
    by_depth = [float(right[bins == b].mean()) if (bins == b).any() else None for b in range(DEPTH_BINS)]
    return {"accuracy": float(right.mean()), "accuracy_by_depth": by_depth}


def train_niah(model: torch.nn.Module, task: NeedleTask, budget: Budget, seed: int,
               eval_lengths: Sequence[int], lr_scale: Optional[Dict[str, float]] = None) -> dict:
    """Train at task.seq_len on fresh seeded batches; accuracy curve at the training length, then the
    accuracy per length in eval_lengths and per depth bin ({str(length): ...})."""
    g = torch.Generator().manual_seed(20_000 + seed)
    dev = device_of(model)

    def batches(step):
        x, y, _ = task.batch(budget.batch_size, g)
        return x.to(dev), y.to(dev)

    out = fit(model, batches, budget, lambda: {"accuracy": needle_accuracy(model, task, budget.eval_size)["accuracy"]},
              lr_scale, sparse=True)
    by_length: Dict[str, float] = {}
    by_depth: Dict[str, List[Optional[float]]] = {}
    for length in eval_lengths:
        if out["final"].get("diverged"):          # scored 0 where it cannot run (train.fit)
            by_length[str(length)], by_depth[str(length)], out["diverged"] = 0.0, [0.0] * DEPTH_BINS, True
            continue
        r = needle_accuracy(model, task.at_length(length), budget.eval_size)
        by_length[str(length)], by_depth[str(length)] = r["accuracy"], r["accuracy_by_depth"]
    out.update(accuracy=by_length[str(task.seq_len)] if str(task.seq_len) in by_length else out["final"]["accuracy"],
               accuracy_by_length=by_length, accuracy_by_depth=by_depth)
    return out
