"""The configuration of a training run: `model:` (HOPEConfig), `data:` and `train:` sections of one YAML."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

import yaml

from .ops import BACKENDS
from .checkpoint import upgrade_model_config
from .config import HOPEConfig, check_choice, check_int, check_keys, check_positive, check_types, load_yaml

OPTIMIZERS = ("adamw", "deep_momentum")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    files: Optional[List[str]] = None     # text files / directories; None = the embedded default corpus
    max_bytes: Optional[int] = 2_000_000  # cap on the corpus size (None: everything)
    val_fraction: float = 0.1

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [self.files]
        check_types(self)
        if self.files is not None:
            if not self.files or not all(self.files):
                raise ValueError(f"files must be null (the default corpus) or a list of file / directory "
                                 f"paths, none empty, got {self.files!r}")
            self.files = list(self.files)
        if self.max_bytes is not None:
            check_positive(self, "max_bytes")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 32                  # global batch (split over DDP processes)
    max_steps: int = 5000
    optimizer: str = "adamw"              # "adamw" | "deep_momentum"
    lr: float = 1e-3
    min_lr: float = 1e-4                  # cosine decays lr to min_lr at max_steps
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum_betas: List[float] = field(default_factory=lambda: [0.9])   # DeepMomentum timescales
    deep_momentum: bool = False           # DeepMomentum: MLP memory read-out
    momentum_normalize: bool = True       # DeepMomentum: RMS-normalised updates
    grad_clip: float = 1.0                # 0 disables
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 500
    log_interval: int = 10
    out_dir: str = "runs/default"
    seed: int = 0
    amp: bool = True                      # bf16 autocast on CUDA (ignored on CPU)
    device: str = "auto"                  # "auto" | "cpu" | "cuda" | "cuda:N"
    num_threads: Optional[int] = None     # torch intra-op CPU threads (None: torch's default)
    backend: Optional[str] = None         # the layers' ops: None (triton where it runs, else torch) | "triton" | "torch" | "reference"
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        check_int(self, "seq_len", "batch_size", "max_steps", "warmup_steps", "eval_interval",
                  "eval_batches", "checkpoint_interval", "log_interval", "seed")
        check_positive(self, "seq_len", "batch_size", "max_steps", "lr", "eval_interval", "eval_batches",
                       "checkpoint_interval", "log_interval")
        check_choice(self, "optimizer", OPTIMIZERS)
        check_choice(self, "backend", BACKENDS)
        if self.num_threads is not None:
            check_int(self, "num_threads")
            check_positive(self, "num_threads")
        for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        for name, size in (("adam_betas", 2), ("momentum_betas", None)):
            betas = getattr(self, name)
            if (size is not None and len(betas) != size) or not betas or not all(0 <= b < 1 for b in betas):
                raise ValueError(f"{name} must be a list of {size or 'one or more'} numbers in [0, 1), "
                                 f"got {betas!r}")
            setattr(self, name, [float(b) for b in betas])
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")


def _in_section(msg: str, section: str, kind) -> str:
    """A field's error message with the field named as section.key."""
    first = re.match(r"\w+", msg)
    if first and first.group() in {f.name for f in dataclasses.fields(kind)}:
        return f"{section}.{msg}"
    return msg if msg.startswith(("unknown", f"{section}.")) else f"{section}: {msg}"


@dataclass
class RunConfig:
    model: HOPEConfig = field(default_factory=HOPEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = {"model": HOPEConfig, "data": DataConfig, "train": TrainConfig}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        unknown = sorted(set(data) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected {sorted(cls.SECTIONS)}")
        parts, backend = {}, None
        for name, kind in cls.SECTIONS.items():
            sec = data.get(name) or {}
            if not isinstance(sec, Mapping):
                raise ValueError(f"config section {name!r} must be a mapping, got {type(sec).__name__}")
            if kind is HOPEConfig:   # an earlier vocabulary; its model.backend is now train.backend
                backend = sec.get("backend")
                sec = upgrade_model_config(sec)
            elif kind is TrainConfig and backend is not None and "backend" not in sec:
                sec = {**sec, "backend": backend}
            try:
                parts[name] = kind(**check_keys(kind, sec, name))
            except ValueError as e:
                raise ValueError(_in_section(str(e), name, kind)) from None
        if parts["train"].seq_len > parts["model"].max_seq_len and parts["model"].position == "learned":
            raise ValueError(f"train.seq_len={parts['train'].seq_len} exceeds model.max_seq_len="
                             f"{parts['model'].max_seq_len} (learned positions)")
        return cls(**parts)

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Optional[List[str]] = None,
             base: Optional[Mapping[str, Any]] = None) -> "RunConfig":
        """YAML file (a name such as "tiny" means hope/configs/tiny.yaml) or a `base` dict, then
        `section.key=value` overrides."""
        data = {k: dict(v or {}) for k, v in (base or {}).items()}
        if path is not None:
            builtin = CONFIG_DIR / f"{path}.yaml"
            data = load_yaml(str(builtin) if not Path(path).exists() and builtin.exists() else path)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot or not name:
                raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
            sec = data.setdefault(section, {}) or {}
            data[section] = sec
            try:
                sec[name] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: {value!r} is not a YAML value "
                                 f"({str(e).splitlines()[0]})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    def to_yaml(self, path: Optional[str] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text
