"""AssociativeMemory: a key-value memory that stores pairs and retrieves values by key similarity.

Stored pairs (k_i, v_i), i = 1..N (keys [N, K], values [N, V]). A query q reads

    sim_i(q) = <q, k_i>                  (similarity="dot")
             = <q/|q|, k_i/|k_i|>        (similarity="cosine")
    w(q)     = softmax_i(sim_i(q) / temperature)
    read(q)  = sum_i w_i(q) v_i

i.e. attention over the stored pairs (a modern Hopfield read-out). As temperature -> 0 the read
returns the value of the most similar key (exact recall of a stored pair); a large temperature
averages. The memory has a fixed `capacity`: once full, new pairs overwrite the oldest (FIFO).
Reads are differentiable in q and in the stored keys / values (store keeps the autograd graph
only when `detach=False`). Stored pairs are buffers, so they are saved in the state_dict.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SIMILARITIES = ("dot", "cosine")


class AssociativeMemory(nn.Module):
    def __init__(self, key_dim: int, value_dim: int, capacity: int = 1024, *, similarity: str = "cosine",
                 temperature: float = 0.1):
        super().__init__()
        for name, v in (("key_dim", key_dim), ("value_dim", value_dim), ("capacity", capacity)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}: expected one of {SIMILARITIES}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.key_dim, self.value_dim, self.capacity = key_dim, value_dim, capacity
        self.similarity, self.temperature = similarity, temperature
        self.register_buffer("keys", torch.zeros(capacity, key_dim))
        self.register_buffer("values", torch.zeros(capacity, value_dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))   # pairs ever stored

    def __len__(self) -> int:
        return min(int(self.count), self.capacity)

    def clear(self) -> None:
        self.count.zero_()

    def store(self, keys: torch.Tensor, values: torch.Tensor, detach: bool = True) -> None:
        """Write pairs: keys [..., K], values [..., V] (same leading shape), oldest overwritten first."""
        if keys.shape[-1] != self.key_dim or values.shape[-1] != self.value_dim:
            raise ValueError(f"keys [..., {self.key_dim}] and values [..., {self.value_dim}] expected, got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if keys.shape[:-1] != values.shape[:-1]:
            raise ValueError(f"keys and values must have the same leading shape, got "
                             f"{tuple(keys.shape[:-1])} and {tuple(values.shape[:-1])}")
        k, v = keys.reshape(-1, self.key_dim), values.reshape(-1, self.value_dim)
        if detach:
            k, v = k.detach(), v.detach()
        total = k.shape[0]
        if total > self.capacity:  # only the newest `capacity` pairs survive
            k, v = k[-self.capacity:], v[-self.capacity:]
        start = int(self.count) + total - k.shape[0]
        slots = (start + torch.arange(k.shape[0], device=self.keys.device)) % self.capacity
        if detach:
            self.keys[slots] = k.to(self.keys)
            self.values[slots] = v.to(self.values)
        else:  # keep the graph: rebuild the buffers out of place
            self.keys = self.keys.index_put((slots,), k.to(self.keys.dtype))
            self.values = self.values.index_put((slots,), v.to(self.values.dtype))
        self.count += total

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Similarities [..., N] of queries [..., K] to the N stored keys."""
        keys = self.keys[: len(self)]
        q = queries.to(keys.dtype)
        if self.similarity == "cosine":
            q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
        return q @ keys.t()

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """read(q): queries [..., K] -> values [..., V]."""
        if queries.shape[-1] != self.key_dim:
            raise ValueError(f"queries must be [..., {self.key_dim}], got {tuple(queries.shape)}")
        if len(self) == 0:
            raise RuntimeError("AssociativeMemory is empty: store pairs before retrieving")
        w = torch.softmax(self.scores(queries) / self.temperature, dim=-1)
        return (w @ self.values[: len(self)]).to(queries.dtype)

    retrieve = forward
