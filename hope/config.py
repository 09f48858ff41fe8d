"""HOPEConfig: the fields of the HOPE language model, validated, with YAML load/save."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional

import yaml

from .checkpoint import upgrade_model_config

ATTENTIONS = ("softmax", "linear", "titans")
CMS_KINDS = ("multiscale", "levels", "none")
CMS_MEMORIES = ("linear", "mlp")
SELFMOD_INITS = ("identity", "orthogonal")
POSITIONS = ("rotary", "learned", "none")


def check_keys(cls, data: Mapping[str, Any], where: str) -> dict:
    """Unknown keys are an error that names them and lists the known ones.

    Returns a copy where strings given for float fields are parsed (YAML reads `3e-4` as a string).
    """
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; known keys: {sorted(known)}")
    out = dict(data)
    for k, v in data.items():
        kind = str(known[k].type)
        if "float" not in kind:
            continue
        try:
            if isinstance(v, str):
                out[k] = float(v)
            elif isinstance(v, (list, tuple)) and kind.startswith(("List", "list")):
                out[k] = [float(x) if isinstance(x, str) else x for x in v]
        except ValueError:
            raise ValueError(f"{where}.{k} must be {_describe(kind)}, got {v!r}") from None
    return out


_TYPE = re.compile(r"(Optional\[)?(List\[)?(int|float|bool|str)\]?\]?")


def _describe(kind: str) -> str:
    m = _TYPE.fullmatch(kind.replace(" ", ""))
    if m is None:
        return kind
    base = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}[m.group(3)]
    if m.group(2):
        base = "a list of " + {"int": "integers", "float": "finite numbers", "bool": "booleans",
                               "str": "strings"}[m.group(3)]
    return base + (" or null" if m.group(1) else "")


def _is(value, base: str) -> bool:
    if base == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if base == "int":
        return isinstance(value, int)
    if base == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str)


def check_types(obj) -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type (int, float, bool, str,
    Optional[...] and List[...] of those); floats must be finite (NaN and inf are refused).
    A ValueError names the field, what it must be and what it got."""
    for f in fields(obj):
        kind = str(f.type).replace(" ", "")
        m = _TYPE.fullmatch(kind)
        if m is None:
            continue
        v = getattr(obj, f.name)
        if m.group(1) and v is None:
            continue
        ok = (isinstance(v, (list, tuple)) and all(_is(x, m.group(3)) for x in v)) if m.group(2) \
            else _is(v, m.group(3))
        if not ok:
            raise ValueError(f"{f.name} must be {_describe(kind)}, got {v!r}")


def check_positive(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{n} must be a positive number, got {v!r}")


def check_int(obj, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{n} must be an integer, got {v!r}")


def check_choice(obj, name: str, choices) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ValueError(f"{name}={v!r}: expected one of {tuple(choices)}")


@dataclass
class HOPEConfig:
    """The HOPE language model. Each block: x += attn(norm(x)), then by `cms` (see hope.block):

    cms="multiscale": x += cms(norm(x)); x += mlp(norm(x))    (the seed block: M delta-rule memories, hope.cms)
    cms="levels":     x += level_l(norm_l(x)) for each period  (the paper's CMS, hope.levels; it replaces the MLP)
    cms="none":       x += mlp(norm(x))                        (attention and MLP: a Transformer block)

    The backend is not part of the model: HOPE(config, backend=...) and HOPE.set_backend choose it.
    """

    vocab_size: int = 256                 # 256 = the byte-level tokenizer
    dim: int = 512
    num_layers: int = 12
    num_heads: int = 8
    head_dim: Optional[int] = None        # None: dim // num_heads
    mlp_ratio: float = 4.0                # MLP hidden size = mlp_ratio * dim (and the MLP levels')
    max_seq_len: int = 1024               # training context (and the learned-position table size)
    attention: str = "softmax"            # "softmax" (SDPA), "linear" (linear_attention), "titans" (titans_scan)
    position: str = "rotary"              # "rotary" | "learned" | "none" (rotary applies to softmax attention)
    rope_base: float = 10000.0
    titans_period: int = 16               # titans: gradients of a block of this many tokens at its start memory
    self_modifying: bool = False          # titans: k, v, lr, decay are in-context memories (the paper's HOPE)
    titans_momentum: bool = False         # titans: momentum on the memory's gradient steps
    titans_selfmod_init: str = "identity"  # self-modifying: M_k, M_v start as I, I | two random orthogonal matrices
    titans_mem_period: Optional[int] = None  # self-modifying: M_mem's own period, None (= titans_period) | 1 (online)
    titans_lr_max: float = 1.0            # titans: inner step bound, in (0, 2)
    cms: str = "multiscale"               # "multiscale" (seed: timescales, then an MLP) | "levels" (paper) | "none"
    num_memory_modules: int = 4           # multiscale: memories (timescales) per head
    cms_tau_min: float = 0.01             # multiscale: the timescales' initial retention range
    cms_tau_max: float = 0.99
    cms_learn_tau: bool = True            # multiscale: tau is a parameter (else fixed)
    cms_periods: List[int] = dataclasses.field(default_factory=lambda: [16, 64, 256])  # levels: C^(l)
    cms_memory: str = "linear"            # levels: "linear" (titans_scan matrix memory) | "mlp" (2-layer MLP)
    cms_lr_max: float = 1.0               # levels: inner step bound, in (0, 2)
    dropout: float = 0.0
    bias: bool = False
    tie_weights: bool = True              # output head shares the token embedding
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        check_types(self)
        check_int(self, "vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "num_memory_modules")
        check_positive(self, "vocab_size", "dim", "num_layers", "num_heads", "max_seq_len",
                       "num_memory_modules", "mlp_ratio", "rope_base", "norm_eps", "init_std")
        if self.head_dim is None:
            if self.dim % self.num_heads:
                raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads} "
                                 "(set head_dim explicitly to decouple them)")
        else:
            check_int(self, "head_dim")
            check_positive(self, "head_dim")
        check_choice(self, "attention", ATTENTIONS)
        check_choice(self, "cms", CMS_KINDS)
        check_choice(self, "cms_memory", CMS_MEMORIES)
        check_choice(self, "titans_selfmod_init", SELFMOD_INITS)
        check_int(self, "titans_period")
        check_positive(self, "titans_period")
        if self.titans_mem_period not in (None, 1, self.titans_period):
            raise ValueError(f"titans_mem_period must be None, 1 or titans_period={self.titans_period}, "
                             f"got {self.titans_mem_period!r}")
        if self.titans_mem_period == 1 and self.titans_period > 1 and self.titans_momentum:
            raise ValueError("titans_mem_period=1 needs titans_momentum=False (M_mem's online rule has no momentum)")
        for name in ("titans_lr_max", "cms_lr_max"):
            if not 0.0 < getattr(self, name) < 2.0:
                raise ValueError(f"{name} must be in (0, 2) (stable inner gradient descent), "
                                 f"got {getattr(self, name)}")
        if (not isinstance(self.cms_periods, (list, tuple)) or not self.cms_periods
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.cms_periods)):
            raise ValueError(f"cms_periods must be a non-empty list of positive integers, got {self.cms_periods!r}")
        self.cms_periods = list(self.cms_periods)
        check_choice(self, "position", POSITIONS)
        if self.position == "rotary" and self.attention == "softmax" and self.resolved_head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
        if not 0.0 < self.cms_tau_min <= self.cms_tau_max < 1.0:
            raise ValueError(f"need 0 < cms_tau_min <= cms_tau_max < 1, got "
                             f"{self.cms_tau_min}, {self.cms_tau_max}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def residual_branches(self) -> int:
        """Residual branches per block: attention, then the CMS levels, or (the multiscale CMS and) the MLP."""
        return {"levels": 1 + len(self.cms_periods), "multiscale": 3, "none": 2}[self.cms]

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HOPEConfig":
        """The fields in `data`; a dict of an earlier vocabulary is read through
        hope.checkpoint.upgrade_model_config first."""
        return cls(**check_keys(cls, upgrade_model_config(data), "HOPEConfig"))

    def to_yaml(self, path: Optional[str] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str) -> "HOPEConfig":
        """A YAML file (or YAML text) holding the fields, or a training config with a `model:` section."""
        data = load_yaml(path_or_text)
        if "model" in data and isinstance(data["model"], Mapping):
            data = data["model"]
        return cls.from_dict(data)


def load_yaml(path_or_text: str) -> dict:
    import os
    if os.path.isdir(path_or_text):
        raise ValueError(f"config {path_or_text} is a directory, not a YAML file")
    try:
        if os.path.exists(path_or_text):
            where = f"config file {path_or_text}"
            with open(path_or_text, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        elif "\n" in path_or_text or ":" in path_or_text and not path_or_text.endswith((".yaml", ".yml")):
            where = "config text"
            data = yaml.safe_load(path_or_text)
        else:
            raise FileNotFoundError(f"config file not found: {path_or_text}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where} is not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a YAML mapping, got {type(data).__name__}")
    return dict(data)
