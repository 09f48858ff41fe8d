"""Data: a byte-level tokenizer, the embedded default corpus, and a token stream with a
train / validation split and deterministic, checkpointable batch sampling. Nothing downloads.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch

DOC_SEPARATOR = b"\n\n"


class ByteTokenizer:
    """UTF-8 bytes are the tokens: vocab_size 256, no unknown token, nothing to download."""

    vocab_size = 256

    def encode(self, text: Union[str, bytes]) -> List[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else bytes(text))

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"byte tokens must be in [0, 256), got {bad[:5]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------- corpora
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})


def stdlib_files() -> List[Path]:
    """The running interpreter's own standard-library sources (*.py under the stdlib dir, without
    site-packages and test suites), sorted by relative path; falls back to the sources of this
    package where the stdlib ships no sources (e.g. a zipped stdlib)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]   # prune: never walk site-packages
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files = sorted((f for f in files if f.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        files = sorted(Path(__file__).parent.glob("*.py"), key=lambda p: p.name)
    return files


def read_corpus(files: Optional[Sequence[Union[str, os.PathLike]]] = None,
                max_bytes: Optional[int] = None) -> bytes:
    """The bytes of `files` (files, or directories read recursively in sorted order), joined by a blank
    line; None means the embedded default corpus (stdlib_files()). Capped at max_bytes."""
    if files is None:
        paths = stdlib_files()
    else:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        paths = []
        for f in files:
            p = Path(f).expanduser()
            if p.is_dir():
                paths += sorted(q for q in p.rglob("*") if q.is_file())
            elif p.is_file():
                paths.append(p)
            elif p.exists():
                raise ValueError(f"data file {f} is not a regular file or a directory")
            else:
                raise FileNotFoundError(f"data file not found: {f}")
        if not paths:
            raise ValueError(f"no data files found in {list(map(str, files))}")
    chunks, total = [], 0
    for p in paths:              # read no byte past max_bytes
        left = None if max_bytes is None else max_bytes - total
        with open(p, "rb") as fh:
            data = fh.read() if left is None else fh.read(left)
        data += DOC_SEPARATOR
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)
    return blob[:max_bytes] if max_bytes is not None else blob


def corpus_info(data: bytes, files: Optional[Sequence[Union[str, os.PathLike]]] = None) -> dict:
    """What a run reads: its files (None: the default corpus, i.e. this Python's standard library,
    which differs between Python versions), the Python version, the size and sha256 of the bytes."""
    return {"files": None if files is None else [str(f) for f in files], "python": platform.python_version(),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------- token stream
class TokenStream:
    """One long token stream split into train (first 1 - val_fraction) and validation (the rest).

    Training batches: window starts drawn uniformly from the train split by a generator seeded with
    (seed, batch index), so batch i is the same on every machine, process count and restart; the
    state to checkpoint is just the number of batches drawn (`position`). Under DDP every rank draws
    the same global batch and keeps its slice. Validation: consecutive non-overlapping windows.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.1, seed: int = 0):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        tokens = tokens.reshape(-1).to(torch.long)
        n_val = int(len(tokens) * val_fraction)
        self.train, self.val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
        for name, split in (("train", self.train), ("validation", self.val)):
            if len(split) < seq_len + 2:
                raise ValueError(f"the {name} split has {len(split)} tokens, fewer than seq_len + 2 = "
                                 f"{seq_len + 2}: give more data or a smaller seq_len / val_fraction")
        self.seq_len, self.seed, self.position = seq_len, seed, 0
        self.corpus: Optional[dict] = None   # corpus_info() of the bytes, when built from a corpus

    @classmethod
    def from_bytes(cls, data: bytes, seq_len: int, val_fraction: float = 0.1, seed: int = 0) -> "TokenStream":
        return cls(torch.frombuffer(bytearray(data), dtype=torch.uint8), seq_len, val_fraction, seed)

    def _windows(self, split: torch.Tensor, starts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        w = split[idx]
        return w[:, :-1], w[:, 1:]

    def next_batch(self, batch_size: int, rank: int = 0, world_size: int = 1,
                   device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
        """(x, y) [batch_size / world_size, seq_len] for this rank's slice of global batch `position`."""
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the number of processes {world_size}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
        starts = torch.randint(0, len(self.train) - self.seq_len - 1, (batch_size,), generator=g)
        self.position += 1
        per = batch_size // world_size
        x, y = self._windows(self.train, starts[rank * per:(rank + 1) * per])
        return x.to(device), y.to(device)

    def val_batches(self, batch_size: int, max_batches: Optional[int] = None,
                    device: Union[str, torch.device] = "cpu") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = (len(self.val) - 1) // self.seq_len
        starts = torch.arange(n) * self.seq_len
        nb = math.ceil(n / batch_size)
        if max_batches is not None:
            nb = min(nb, max_batches)
        for b in range(nb):
            x, y = self._windows(self.val, starts[b * batch_size:(b + 1) * batch_size])
            yield x.to(device), y.to(device)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seed = int(state["position"]), int(state["seed"])
