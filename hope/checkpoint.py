"""Checkpoint files of `hope.train`: everything needed for an exact resume, saved atomically.

A checkpoint holds only tensors and plain Python data (dicts, lists, tuples, numbers, strings), so
it loads with `torch.load(weights_only=True)`: a file that would need any other object to unpickle
(and so could run code while loading) is refused with a ValueError. It carries the sha256 of its
contents (every tensor's dtype, shape and bytes, and the plain data), checked on load: a file
changed after it was written is refused as corrupted. Files written before the digest existed
load unchecked.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pickle
import random
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# v3: the models with the delta-rule CMS (the CMS delta-rule write and gated read-out, CMS levels reading their
# block-start weights): a v2 file would load into another model. v2: no NumPy objects inside (v1 held
# NumPy's RNG state as an array).
FORMAT = "hope-checkpoint-v3"
CHECKPOINT_NAME = "ckpt.pt"
DIGEST_KEY = "sha256"
REQUIRED = {"config": dict, "model": dict, "step": int}   # what every reader of a checkpoint needs
RESUME = {"optimizer": dict, "scheduler": dict, "data": dict, "rng": dict}   # what a resume needs too


# HOPEConfig fields that were removed, at the only value the model now builds, and why.
REMOVED_MODEL_FIELDS = {
    "cms_update": ("delta", "the additive write is an ablation design (benchmarks.quality.designs)"),
    "cms_conv_size": (4, "the CMS without its short convolution is an ablation design (benchmarks.quality.designs)"),
    "cms_gated_readout": (True, "the ungated read-out is an ablation design (benchmarks.quality.designs)"),
    "cms_per_head_tau": (True, "the timescales are per head"),
    "cms_data_dependent_mix": (True, "the mixing gates are data dependent"),
    "linear_normalize": (True, "linear attention divides by q . sum(k)"),
    "titans_conv": (4, "the Titans layer's short convolution has window 4"),
}


def upgrade_model_config(data) -> dict:
    """A model config dict of any earlier HOPEConfig vocabulary in today's (a copy; today's passes as is).

    use_cms=False -> cms="none"; cms="decay" (the old name of the multiscale CMS) -> "multiscale"; the
    CMS levels' inner step bound was titans_lr_max, now cms_lr_max; `backend` (a run-time choice, not
    part of the model) is dropped; a removed field (REMOVED_MODEL_FIELDS) at the value the model builds
    is dropped, at any other value it is a ValueError (no model of today computes it)."""
    if not hasattr(data, "items"):
        raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
    d = dict(data)
    old = bool({"use_cms", "backend"} & set(d)) or d.get("cms") == "decay" or bool(set(REMOVED_MODEL_FIELDS) & set(d))
    if not old:
        return d
    for name, (value, why) in REMOVED_MODEL_FIELDS.items():
        if name in d and d.pop(name) != value:
            raise ValueError(f"model config {name}={data[name]!r}: this field was removed and only "
                             f"{name}={value!r} is built ({why})")
    d.pop("backend", None)
    if d.get("cms") == "decay":
        d["cms"] = "multiscale"
    if "use_cms" in d:
        use = d.pop("use_cms")
        if not isinstance(use, bool):
            raise ValueError(f"model config use_cms must be true or false, got {use!r}")
        if not use:
            d["cms"] = "none"
        elif d.get("cms") == "none":
            raise ValueError("model config use_cms=True contradicts cms='none'")
    if "cms_lr_max" not in d and "titans_lr_max" in d:
        d["cms_lr_max"] = d["titans_lr_max"]
    return d


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
    """Where this process writes `path` before renaming it: `<path>.tmp.<pid>`, so that two
    processes never write one temporary file."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp.{os.getpid()}")


def remove_temporaries(path) -> None:
    """Temporary files of `path` left by killed processes (any pid; call it holding the run's lock)."""
    path = Path(path)
    for f in glob.glob(glob.escape(str(path)) + ".tmp*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


def payload_digest(obj) -> str:
    """sha256 over a checkpoint's contents: every tensor's dtype, shape and bytes, and the plain data
    (types, keys in order, reprs of numbers and strings)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(o, dict):
            h.update(f"D{len(o)}".encode())
            for k, v in o.items():
                walk(k)
                walk(v)
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)}".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(path, payload: dict) -> Path:
    """torch.save (with the contents' digest) to this process's temporary file, then rename: a crash
    or an interrupt never leaves a half-written checkpoint, and the temporary file is removed when
    the save fails (a full disk raises the OSError of the write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    obj = {"format": FORMAT, **{k: v for k, v in payload.items() if k not in ("format", DIGEST_KEY)}}
    obj[DIGEST_KEY] = payload_digest(obj)
    try:
        with open(tmp, "wb") as f:     # through a Python file: a failed write raises its OSError
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint_path(path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if p.exists() and not p.is_file():
        raise ValueError(f"{p} is not a checkpoint: not a regular file")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}"
                                + (f" (no {CHECKPOINT_NAME} in that directory)" if Path(path).is_dir() else ""))
    return p


def load_checkpoint(path, map_location: Optional[str] = "cpu", *, for_resume: bool = False) -> dict:
    """Load a checkpoint written by save_checkpoint (a file, or a run directory holding ckpt.pt).

    Only tensors and plain data are unpickled (weights_only=True); anything else is refused, and so
    is a file whose digest does not match its contents (corrupted) or that lacks what a checkpoint
    holds (`for_resume`: the optimizer, scheduler, data and RNG states too)."""
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
        raise ValueError(f"{p} is not a readable hope checkpoint (corrupted, truncated or another kind of "
                         f"file): {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - any other failure means "not a checkpoint"
        raise ValueError(f"{p} is not a readable hope checkpoint (corrupted, truncated or another kind of "
                         f"file): {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else None
        older = isinstance(got, str) and got.startswith("hope-checkpoint-v")
        raise ValueError(f"{p} is not a hope checkpoint (expected format {FORMAT!r}"
                         + (f", got {got!r}" if got else "") + ")"
                         + ("; it was written by an older version whose models compute differently: retrain"
                            if older else ""))
    want = dict(REQUIRED, **(RESUME if for_resume else {}))
    wrong = [k for k, kind in want.items() if not isinstance(ckpt.get(k), kind) or isinstance(ckpt.get(k), bool)]
    if wrong:
        raise ValueError(f"{p} is not a hope checkpoint: it says format {FORMAT!r} but lacks {wrong} "
                         "(or holds them with the wrong type)")
    stored = ckpt.pop(DIGEST_KEY, None)
    if stored is not None and stored != payload_digest(ckpt):
        raise ValueError(f"{p} is corrupted: its contents do not match the sha256 written with it; "
                         "do not use it (resume from another copy, or retrain)")
    bad = [k for k, v in ckpt["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{p} is not a hope checkpoint: its model weights hold non-tensors ({bad[:3]})")
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict, where) -> None:
    """model.load_state_dict(state), after checking that every weight is there with the model's shape
    (a ValueError naming the first misfits otherwise)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = [f"{what} {names[:3]}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                 for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape:", shapes))
                 if names]
        raise ValueError(f"the weights in {where} do not fit the model of its config: {'; '.join(parts)}")
    model.load_state_dict(state)


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip() and "weights_only" not in line]
    return lines[-1].strip() if lines else type(e).__name__
