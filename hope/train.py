"""Train a HOPE language model: `python -m hope.train --config tiny` (or `hope-train`).

YAML config (model / data / train sections, see hope/configs/), AdamW or DeepMomentum, cosine
schedule with warmup, gradient clipping, bf16 autocast on CUDA, a tqdm bar with loss and tokens/s,
periodic validation (loss, bits per byte), checkpoints with exact resume (model, optimizer,
scheduler, RNG states, data position), and DDP under torchrun (gloo on CPU, nccl on CUDA: each
process takes a slice of the global batch).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import ByteTokenizer, TokenStream, read_corpus
from .model import HOPE
from .optim import DeepMomentum
from .run_config import RunConfig


# ---------------------------------------------------------------------- pieces shared with evaluate
def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_stream(cfg: RunConfig) -> TokenStream:
    if cfg.model.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the byte vocabulary (256)")
    data = read_corpus(cfg.data.files, cfg.data.max_bytes)
    return TokenStream.from_bytes(data, cfg.train.seq_len, cfg.data.val_fraction, cfg.train.seed)


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
    loss = total / count
    return {"loss": loss, "bpb": loss / math.log(2), "ppl": math.exp(min(loss, 50.0)),
            "tokens_per_s": count / max(dt, 1e-9)}


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_ratio at max_steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: HOPE, cfg: RunConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases, tau logits)."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas))
    return DeepMomentum(groups, lr=t.lr, betas=t.momentum_betas, deep=t.deep_momentum,
                        normalize=t.momentum_normalize, backend=cfg.model.backend)


# ---------------------------------------------------------------------- distributed
def init_distributed():
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return rank, world, local_rank


# ---------------------------------------------------------------------- the loop
def train(cfg: RunConfig, resume=None, stop_at: Optional[int] = None) -> dict:
    """Run (or resume) training; returns {"losses": {step: loss}, "val": [{step, loss, bpb}], ...}.

    resume: a checkpoint path / run directory, or an already loaded checkpoint dict; its model
    config must equal cfg.model. stop_at ends the run early at that step (with a checkpoint)
    without changing the schedule, as if interrupted; a later resume continues exactly.
    """
    rank, world, local_rank = init_distributed()
    t = cfg.train
    device = pick_device(t.device, local_rank)
    out_dir = Path(t.out_dir)
    ckpt = load_checkpoint(resume) if isinstance(resume, (str, os.PathLike)) else resume
    if ckpt is not None:
        saved = dict(ckpt["config"]["model"], backend=cfg.model.backend)
        if saved != dict(cfg.model.to_dict()):
            diff = sorted(k for k in saved if saved[k] != cfg.model.to_dict().get(k))
            raise ValueError(f"the checkpoint's model config differs from this run's in {diff}")

    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    stream = build_stream(cfg)
    model = HOPE(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg)
    min_ratio = t.min_lr / t.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, min_ratio))
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        stream.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(str(out_dir / "config.yaml"))
    log = open(out_dir / "metrics.jsonl", "a") if is_main else None
    result = {"losses": {}, "val": [], "out_dir": str(out_dir), "num_parameters": model.num_parameters()}
    last = min(t.max_steps, stop_at) if stop_at is not None else t.max_steps
    local_batch = t.batch_size // world if t.batch_size % world == 0 else None
    if local_batch is None:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the number of processes {world}")

    def record_val(s: int) -> None:
        m = evaluate_loss(model, stream, local_batch, t.eval_batches, device, t.amp)
        result["val"].append({"step": s, **m})
        if is_main:
            _write(log, {"step": s, "val_loss": m["loss"], "val_bpb": m["bpb"]})
            _print(f"step {s}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits/byte, ppl {m['ppl']:.2f}", t)

    if step == 0:
        record_val(0)
    bar = _progress(step, last, t.progress and is_main)
    model.train()
    tokens_per_step = t.batch_size * t.seq_len
    t_start, tok_since = time.perf_counter(), 0
    while step < last:
        x, y = stream.next_batch(t.batch_size, rank, world, device)
        with autocast(device, t.amp):
            _, loss = ddp(x, y)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        loss_val = loss.detach().float()
        if world > 1:
            dist.all_reduce(loss_val)
            loss_val /= world
        loss_val = loss_val.item()
        result["losses"][step] = loss_val
        tok_since += tokens_per_step
        tps = tok_since / max(time.perf_counter() - t_start, 1e-9)
        result["tokens_per_s"] = tps
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}")
        if is_main and step % t.log_interval == 0:
            _write(log, {"step": step, "loss": loss_val, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps})
        if step % t.eval_interval == 0 or step == t.max_steps:
            record_val(step)
        if step % t.checkpoint_interval == 0 or step == last:
            if is_main:
                save_checkpoint(out_dir / CHECKPOINT_NAME, {
                    "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state(),
                    "step": step})
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    result["step"] = step
    return result


def _progress(start: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _print(msg: str, t) -> None:
    if t.progress:
        from tqdm.auto import tqdm
        tqdm.write(msg)
    else:
        print(msg, flush=True)


def _write(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()


# ---------------------------------------------------------------------- command line
def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(prog="hope-train", description="Train a HOPE language model.")
    p.add_argument("--config", help="YAML config file, or the name of a built-in one (default, tiny); "
                                    "default: `default`, or the checkpoint's config with --resume")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", choices=["triton", "torch", "reference"])
    p.add_argument("--optimizer", choices=["adamw", "deep_momentum"])
    p.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="resume from a checkpoint file or run directory (no value: <out-dir>/ckpt.pt)")
    p.add_argument("--stop-at", type=int, help="stop at this step (with a checkpoint) without changing the schedule")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.dim=128 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p, p.parse_args(argv)


def config_from_args(args, base: Optional[dict] = None) -> RunConfig:
    """The --config file (or `base`, e.g. a checkpoint's config), then the command-line overrides."""
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("out_dir", "train.out_dir"),
                      ("batch_size", "train.batch_size"), ("lr", "train.lr"), ("device", "train.device"),
                      ("backend", "model.backend"), ("optimizer", "train.optimizer")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.no_progress:
        overrides.append("train.progress=false")
    path = args.config if args.config is not None or base is not None else "default"
    return RunConfig.load(path, overrides, base=None if args.config is not None else base)


def main(argv: Optional[List[str]] = None) -> int:
    parser, args = parse_args(argv)
    try:
        ckpt = None
        if args.resume is not None:
            path = args.resume
            if path == "auto":
                path = args.out_dir or config_from_args(args).train.out_dir
            ckpt = load_checkpoint(path)
        cfg = config_from_args(args, base=ckpt["config"] if ckpt is not None else None)
        res = train(cfg, resume=ckpt, stop_at=args.stop_at)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        v = res["val"][-1] if res["val"] else None
        msg = f"done: step {res['step']}, {res.get('tokens_per_s', 0):,.0f} tokens/s"
        if v is not None:
            msg += f", val loss {v['loss']:.4f}, {v['bpb']:.4f} bits/byte (at step {v['step']})"
        print(msg + f"; checkpoint in {res['out_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
