"""What training, evaluation and the benchmarks share at run time: the device, autocast, the token
stream of a run config, the validation loss, the learning-rate schedule, and the lock that makes
one process the only writer of a run directory."""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from hope_kernels.utils import triton_unavailable_reason

from .data import ByteTokenizer, TokenStream, corpus_info, read_corpus
from .run_config import DEVICE_PATTERN, RunConfig


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA device `local_rank` if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def check_backend_runs(backend: Optional[str], device: torch.device) -> None:
    """backend='triton' where Triton cannot run is refused before a run starts (not at its first step)."""
    if backend == "triton":
        why = triton_unavailable_reason(device)
        if why is not None:
            raise ValueError(f"backend='triton' cannot run on {device}: {why}")


class CommandLine(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def one_line(e: BaseException) -> str:
    """An error for the command line: its message on one line (an OSError with its path)."""
    msg = str(e)
    if isinstance(e, OSError) and e.strerror and not isinstance(e, FileNotFoundError):
        msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename:
            msg += f" (on {disk_of(Path(e.filename).parent)})"
    return " ".join(msg.split())


def disk_of(path) -> str:
    """"the disk mounted at M (N MiB free)" for the file system holding `path`, for error messages."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = f", {shutil.disk_usage(p).free / 2**20:,.0f} MiB free"
    except OSError:
        free = ""
    return f"the disk mounted at {mount}{free}"


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_stream(cfg: RunConfig) -> TokenStream:
    if cfg.model.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the byte vocabulary (256)")
    data = read_corpus(cfg.data.files, cfg.data.max_bytes)
    stream = TokenStream.from_bytes(data, cfg.train.seq_len, cfg.data.val_fraction, cfg.train.seed)
    stream.corpus = corpus_info(data, cfg.data.files)
    return stream


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, stream: TokenStream, batch_size: int, max_batches: Optional[int],
                  device: torch.device, amp: bool = True) -> dict:
    """Mean next-token loss over validation windows: loss (nats), bits per byte (= bits per token
    for the byte tokenizer), perplexity and tokens per second."""
    was_training = model.training
    model.eval()
    total, count, t0 = 0.0, 0, time.perf_counter()
    for x, y in stream.val_batches(batch_size, max_batches, device):
        with autocast(device, amp):
            _, loss = model(x, y)
        total += loss.item() * y.numel()
        count += y.numel()
    dt = time.perf_counter() - t0
    model.train(was_training)
    if count == 0:
        raise ValueError(f"no validation batches to evaluate (max_batches={max_batches})")
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2), "ppl": math.exp(min(loss, 50.0)),
            "tokens_per_s": count / max(dt, 1e-9)}


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------- one writer per run directory
LOCK_NAME = "hope-train.lock"


class RunLocked(ValueError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive `flock` on DIR/hope-train.lock, held while a process writes the run in DIR.

    Taken without waiting: a second process refuses at once, naming the lock and the holder's pid
    (written into the lock file). The kernel drops the lock when its holder exits in any way, even
    killed; the file is removed on a normal release. A holder checks after locking that the path
    still names the file it locked (a releasing holder may just have removed it), so two processes
    never both hold the directory. Reentrant within a process. A directory the lock had to create
    is removed again on release when nothing else was written into it.
    """

    _held: dict = {}     # resolved directory -> [RunLock, depth]

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_dir = False

    def __enter__(self) -> "RunLock":
        d = self.directory
        if d.exists() and not d.is_dir():
            raise ValueError(f"the run directory {d} is a file, not a directory")
        key = str(d.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            return self
        self._created_dir = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"cannot create the run directory {d}: a part of that path is a file") from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                self._cleanup_dir()
                raise RunLocked(f"{d} is in use: another hope-train (pid {self._holder()}) holds its lock "
                                f"{self.path}; wait for it to finish or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)     # locked a file its holder removed while releasing: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        RunLock._held[key] = [self, 1]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.directory.resolve())
        entry = RunLock._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del RunLock._held[key]
        owner = entry[0]
        with contextlib.suppress(FileNotFoundError):
            owner.path.unlink()           # before unlocking: a waiting process then locks a new file
        os.close(owner._fd)
        owner._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.directory.rmdir()     # only when empty

    def _holder(self) -> str:
        for _ in range(20):    # the holder writes its pid right after locking
            with contextlib.suppress(OSError):
                pid = self.path.read_text().strip()
                if pid:
                    return pid
            time.sleep(0.01)
        return "unknown"
