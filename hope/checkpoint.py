"""Checkpoint files of `hope.train`: everything needed for an exact resume, saved atomically.

A checkpoint holds only tensors and plain Python data (dicts, lists, tuples, numbers, strings), so
it loads with `torch.load(weights_only=True)`: a file that would need any other object to unpickle
(and so could run code while loading) is refused with a ValueError.
"""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# v3: the models of issue 12 (the CMS delta-rule write and gated read-out, CMS levels reading their
# block-start weights): a v2 file would load into another model. v2: no NumPy objects inside (v1 held
# NumPy's RNG state as an array).
FORMAT = "hope-checkpoint-v3"
CHECKPOINT_NAME = "ckpt.pt"


def rng_state() -> dict:
    """The torch, Python and NumPy (as plain data) random states, CUDA's when it is in use."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_path(path) -> Path:
    path = Path(path)
    return path.with_suffix(path.suffix + ".tmp")


def save_checkpoint(path, payload: dict) -> Path:
    """torch.save to a temporary file, then rename: a crash or an interrupt never leaves a
    half-written checkpoint, and the temporary file is removed when the save fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}"
                                + (f" (no {CHECKPOINT_NAME} in that directory)" if Path(path).is_dir() else ""))
    return p


def load_checkpoint(path, map_location: Optional[str] = "cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (a file, or a run directory holding ckpt.pt).

    Only tensors and plain data are unpickled (weights_only=True); anything else is refused."""
    p = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"GLOBAL ([\w.]+)", str(e))
        if why:
            raise ValueError(f"refusing to load {p}: it holds Python objects that are not tensors or plain "
                             f"data (it asks for {why.group(1)}), and unpickling them could run code. "
                             "hope checkpoints never "
                             "hold such objects (checkpoints older than format v2 held NumPy arrays: "
                             "retrain); do not load files you do not trust.") from None
        raise ValueError(f"{p} is not a readable hope checkpoint: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any other failure means "not a checkpoint"
        raise ValueError(f"{p} is not a readable hope checkpoint: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else None
        older = isinstance(got, str) and got.startswith("hope-checkpoint-v")
        raise ValueError(f"{p} is not a hope checkpoint (expected format {FORMAT!r}"
                         + (f", got {got!r}" if got else "") + ")"
                         + ("; it was written by an older version whose models compute differently: retrain"
                            if older else ""))
    return ckpt


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip() and "weights_only" not in line]
    return lines[-1].strip() if lines else type(e).__name__
