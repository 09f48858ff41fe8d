"""Train a HOPE language model: `python -m hope.train --config tiny` (or `hope-train`).

YAML config (model / data / train sections, see hope/configs/), AdamW or DeepMomentum, cosine
schedule with warmup, gradient clipping, bf16 autocast on CUDA, a tqdm bar with loss and tokens/s,
periodic validation (loss, bits per byte), checkpoints with exact resume (model, optimizer,
scheduler, RNG states, data position), and DDP under torchrun (gloo on CPU, nccl on CUDA: each
process takes a slice of the global batch).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (CHECKPOINT_NAME, load_checkpoint, load_model_state, remove_temporaries,
                         resolve_checkpoint_path, rng_state, save_checkpoint, set_rng_state, temporary_path)
from .model import HOPE
from .ops import BACKENDS
from .optim import DeepMomentum
from .run_config import RunConfig
from .runtime import (CommandLine, RunLock, autocast, build_stream, check_backend_runs, disk_of, evaluate_loss,
                      lr_factor, one_line, pick_device)


# ---------------------------------------------------------------------- the optimizer
def build_optimizer(model: HOPE, cfg: RunConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases, tau logits)."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas))
    return DeepMomentum(groups, lr=t.lr, betas=t.momentum_betas, deep=t.deep_momentum,
                        normalize=t.momentum_normalize, backend=t.backend)


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


# ---------------------------------------------------------------------- run directories
METRICS_NAME = "metrics.jsonl"
RUN_INFO_NAME = "run.json"
CONFIG_NAME = "config.yaml"
RUN_FILES = (CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, RUN_INFO_NAME)
# what a resumed run may change (applied, and recorded in run.json); every other key must be the checkpoint's
RESUMABLE_CHANGES = ("train.max_steps", "train.out_dir", "train.device", "train.num_threads", "train.progress",
                     "train.log_interval", "train.eval_interval", "train.eval_batches",
                     "train.checkpoint_interval", "train.backend")


class RunExistsError(ValueError):
    """The output directory holds files of a run and neither resume nor overwrite was asked for."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient, weight or validation loss: the run stops before saving it."""


class RunWriteError(RuntimeError):
    """A file of the run could not be written (a full disk): the run stops, the last checkpoint stays."""


def checkpoint_step(path) -> str:
    """The step of the checkpoint at `path`, for messages ("?" when it cannot be read cheaply)."""
    try:   # mmap: the weights are not read
        return str(int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]))
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


def refuse_existing(out_dir: Path) -> None:
    """A directory holding any file of a run (a checkpoint, or a config / metrics of a run killed before
    its first checkpoint) is refused (RunExistsError) without --resume / --overwrite."""
    ckpt = out_dir / CHECKPOINT_NAME
    if ckpt.is_file():
        raise RunExistsError(
            f"{out_dir} already holds a checkpoint (step {checkpoint_step(ckpt)}); nothing was changed. "
            f"Continue that run with `hope-train --resume {out_dir}`, start it over with --overwrite "
            "(deletes its checkpoint and metrics), or pick another --out-dir.")
    present = [f for f in RUN_FILES if (out_dir / f).exists()]
    if present:
        raise RunExistsError(
            f"{out_dir} already holds files of a run ({', '.join(present)}) but no checkpoint; nothing was "
            "changed. Start over there with --overwrite (deletes them), or pick another --out-dir.")


def _flat(cfg: dict) -> dict:
    return {f"{section}.{k}": v for section, values in cfg.items() for k, v in values.items()}


def check_resumable(ckpt: dict, cfg: RunConfig) -> dict:
    """A resumed run is the checkpoint's run: cfg may differ from the checkpoint's config only in
    RESUMABLE_CHANGES. Returns those changes {key: [checkpoint's value, this run's]}."""
    # through RunConfig, so fields added since the checkpoint was written take their defaults
    saved, now = _flat(RunConfig.from_dict(ckpt["config"]).to_dict()), _flat(cfg.to_dict())
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    refused = [k for k in diff if k not in RESUMABLE_CHANGES]
    if refused:
        got = ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in refused)
        raise ValueError(f"cannot resume: the checkpoint was trained with {got}; a resumed run keeps its "
                         f"settings (only {', '.join(RESUMABLE_CHANGES)} may change). Resume without "
                         "changing them, or start a new run (--overwrite or another --out-dir)")
    return {k: [saved.get(k), now.get(k)] for k in diff}


def write_text(path: Path, text: str) -> None:
    """Write this process's temporary file, then rename: a reader sees the old file or the new one."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rewrite_metrics(path: Path, through_step: Optional[int]) -> None:
    """Keep the records of steps <= through_step (None: none), so that a resumed run logs each step
    once; records past the checkpoint and a torn last line (a killed process) are dropped."""
    if not path.exists():
        return
    kept = []
    if through_step is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line, parse_constant=_reject_constant)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= through_step:
                kept.append(line + "\n")
    write_text(path, "".join(kept))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class StopSignals:
    """SIGINT / SIGTERM ask the training loop to stop after the current step, with a checkpoint;
    a second signal aborts at once (KeyboardInterrupt carrying the signal number)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            e = KeyboardInterrupt()
            e.signum = signum
            raise e
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the loop
def train(cfg: RunConfig, resume=None, stop_at: Optional[int] = None, overwrite: bool = False,
          compile: bool = False) -> dict:
    """Run (or resume) training; returns {"losses": {step: loss}, "val": [{step, loss, bpb}], ...}.

    resume: a checkpoint path / run directory, or an already loaded checkpoint dict; cfg may differ
    from its config only in RESUMABLE_CHANGES. The run writes to cfg.train.out_dir, holding its lock
    (RunLock: a directory another process writes is refused at once; under torchrun rank 0 holds
    it); without `resume` a directory that holds any run file is refused (RunExistsError) unless
    `overwrite`, which deletes them and starts over. stop_at ends the run early at that step (with
    a checkpoint) without changing the schedule; a later resume continues exactly. SIGINT/SIGTERM
    stop the same way at the current step (result["stopped_by"]). A non-finite loss, gradient,
    weight or validation loss raises TrainingDiverged before anything of that step is saved; a
    failed write (a full disk) raises RunWriteError naming the disk and the step.
    """
    rank, world, local_rank = init_distributed()
    device = preflight(cfg, stop_at, local_rank)
    with RunLock(cfg.train.out_dir) if rank == 0 else contextlib.nullcontext():
        ckpt = load_checkpoint(resume, for_resume=True) if isinstance(resume, (str, os.PathLike)) else resume
        return _train(cfg, ckpt, stop_at, overwrite, rank, world, device, compile)


def preflight(cfg: RunConfig, stop_at: Optional[int] = None, local_rank: int = 0) -> torch.device:
    """The checks that need no file of the run: the device, the backend on it, stop_at, out_dir."""
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at must be a step >= 1, got {stop_at}")
    device = pick_device(cfg.train.device, local_rank)
    check_backend_runs(cfg.train.backend, device)
    out_dir = Path(cfg.train.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a directory")
    return device


def _train(cfg: RunConfig, ckpt: Optional[dict], stop_at: Optional[int], overwrite: bool, rank: int, world: int,
           device: torch.device, compile: bool = False) -> dict:
    t = cfg.train
    out_dir = Path(t.out_dir)
    changes = {}
    if ckpt is not None:
        changes = check_resumable(ckpt, cfg)
    elif not overwrite:
        refuse_existing(out_dir)
    step = int(ckpt["step"]) if ckpt is not None else 0
    last = min(t.max_steps, stop_at) if stop_at is not None else t.max_steps
    is_main = rank == 0
    ckpt_path = out_dir / CHECKPOINT_NAME
    result = {"losses": {}, "val": [], "out_dir": str(out_dir), "step": step, "stopped_by": None,
              "checkpoint": None}
    if step >= last:
        result["nothing_to_do"] = True
        if ckpt_path.is_file():
            result["checkpoint"] = str(ckpt_path)
        return result

    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    stream = build_stream(cfg)
    model = HOPE(cfg.model, backend=t.backend).to(device)
    optimizer = build_optimizer(model, cfg)
    min_ratio = t.min_lr / t.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t.warmup_steps, t.max_steps, min_ratio))
    meta = {"python": platform.python_version(), "torch": str(torch.__version__), "corpus": stream.corpus}
    if ckpt is not None:
        load_model_state(model, ckpt["model"], "the checkpoint")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"the checkpoint's optimizer state does not fit this run's optimizer "
                             f"({t.optimizer}): {type(e).__name__}: {e}") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        stream.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    if compile:   # the whole model one graph (fullgraph: a graph break is an error); eval stays eager
        ddp = torch.compile(ddp, fullgraph=True)
    result["num_parameters"] = model.num_parameters()
    local_batch = t.batch_size // world if t.batch_size % world == 0 else None
    if local_batch is None:
        raise ValueError(f"train.batch_size={t.batch_size} must be divisible by the number of processes {world}")

    bar = _progress(step, last, t.progress and is_main and sys.stderr.isatty())
    say = (lambda msg: _print(msg, bar)) if is_main else (lambda msg: None)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:                                 # left by saves of killed processes
            remove_temporaries(out_dir / name)
        replaced = [f for f in RUN_FILES if (out_dir / f).exists()] if ckpt is None else []
        for name in replaced:
            (out_dir / name).unlink()                          # --overwrite: start over
        rewrite_metrics(out_dir / METRICS_NAME, step if ckpt is not None else None)
        write_text(out_dir / CONFIG_NAME, cfg.to_yaml())       # what runs, changes on resume included
        info = {**meta, "start_step": step, **({"changed_on_resume": changes} if changes else {})}
        write_text(out_dir / RUN_INFO_NAME, json.dumps(info, indent=2) + "\n")
        if ckpt is None:
            say(f"{'starting over (--overwrite)' if replaced else 'new run'} in {out_dir}: steps 0 -> {last}")
        else:
            changed = "".join(f", {k} {a!r} -> {b!r}" for k, (a, b) in changes.items() if k != "train.out_dir")
            say(f"resuming {out_dir} at step {step} -> {last}{changed}")
            old = (ckpt.get("meta") or {}).get("corpus") or {}
            if old.get("sha256") not in (None, stream.corpus["sha256"]):
                print(f"warning: the corpus differs from the one this run was trained on (Python "
                      f"{old.get('python')} -> {stream.corpus['python']}, sha256 {old['sha256'][:12]} -> "
                      f"{stream.corpus['sha256'][:12]}): the resumed run reads other data", file=sys.stderr)
    log = open(out_dir / METRICS_NAME, "a") if is_main else None
    saved_step = step if ckpt is not None else None

    def diverged(s: int, what: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint (step {saved_step}) is kept in {out_dir}" if saved_step is not None
                else "no checkpoint had been written yet")
        hint = "lower train.lr" + (" or turn gradient clipping on (train.grad_clip > 0)" if not t.grad_clip else "")
        return TrainingDiverged(f"training diverged at step {s}: {what}. No checkpoint was written for it; "
                                f"{kept}. Try again from there: {hint}.")

    def record_val(s: int) -> None:
        m = evaluate_loss(model, stream, local_batch, t.eval_batches, device, t.amp)
        if not math.isfinite(m["loss"]):
            raise diverged(s, f"the validation loss is {m['loss']}")
        result["val"].append({"step": s, **m})
        if is_main:
            _write(log, {"step": s, "val_loss": m["loss"], "val_bpb": m["bpb"]})
            say(f"step {s}: val loss {m['loss']:.4f}, {m['bpb']:.4f} bits/byte, ppl {m['ppl']:.2f}")

    def save(s: int) -> None:
        nonlocal saved_step
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise diverged(s, f"non-finite weights in {bad[:3]}")
        if is_main:
            try:
                save_checkpoint(ckpt_path, {
                    "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state(),
                    "step": s, "meta": meta})
            except OSError as e:
                kept = (f"the checkpoint of step {saved_step} is kept" if saved_step is not None
                        else "no checkpoint had been written yet")
                raise RunWriteError(f"cannot save the checkpoint of step {s} to {ckpt_path}: "
                                    f"{e.strerror or e} on {disk_of(out_dir)}; {kept}. Free space there "
                                    f"and resume, or pick another --out-dir") from None
        if world > 1:
            dist.barrier()
        saved_step = s

    try:
        if step == 0:
            record_val(0)
        model.train()
        tokens_per_step = t.batch_size * t.seq_len
        t_start, tok_since = time.perf_counter(), 0
        with StopSignals() as stop:
            while step < last:
                x, y = stream.next_batch(t.batch_size, rank, world, device)
                with autocast(device, t.amp):
                    _, loss = ddp(x, y)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                stats = torch.stack([loss.detach().float().reshape(()), gnorm.detach().float().to(loss.device),
                                     loss.new_tensor(float(stop.signum is not None), dtype=torch.float32)])
                if world > 1:
                    dist.all_reduce(stats)      # the stop vote too: every rank stops at the same step
                loss_val, gnorm_val, stop_votes = (v / world if i < 2 else v for i, v in enumerate(stats.tolist()))
                if not (math.isfinite(loss_val) and math.isfinite(gnorm_val)):
                    raise diverged(step + 1, f"the loss is {loss_val} and the gradient norm {gnorm_val}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                result["losses"][step] = loss_val
                tok_since += tokens_per_step
                tps = tok_since / max(time.perf_counter() - t_start, 1e-9)
                result["tokens_per_s"] = tps
                lr = scheduler.get_last_lr()[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}")
                if is_main and step % t.log_interval == 0:
                    _write(log, {"step": step, "loss": loss_val, "grad_norm": gnorm_val, "lr": lr,
                                 "tokens_per_s": tps})
                    if bar is None:
                        say(f"step {step}/{last} | loss {loss_val:.4f} | grad norm {gnorm_val:.3g} | "
                            f"lr {lr:.3g} | {tps:,.0f} tokens/s")
                if step % t.eval_interval == 0 or step == t.max_steps:
                    record_val(step)
                if step % t.checkpoint_interval == 0 or step == last or stop_votes:
                    save(step)
                if stop_votes and step < last:
                    result["stopped_by"] = signal.Signals(stop.signum or signal.SIGTERM).name
                    break
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    result["step"] = step
    result["checkpoint"] = str(ckpt_path) if saved_step == step else None
    return result


def _progress(start: int, total: int, enabled: bool):
    """A tqdm bar on a terminal only; redirected output gets plain log lines instead."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


def _print(msg: str, bar=None) -> None:
    if bar is not None:
        bar.write(msg)
    else:
        print(msg, flush=True)


def _write(log, record: dict) -> None:
    log.write(json.dumps(record, allow_nan=False) + "\n")   # never a NaN token: strict JSON
    log.flush()


# ---------------------------------------------------------------------- command line
def parse_args(argv: Optional[List[str]] = None):
    p = CommandLine(
        prog="hope-train", description="Train a HOPE language model.",
        epilog="One hope-train at a time writes a run directory (it holds DIR/hope-train.lock). A directory that "
               "holds any run file is never overwritten silently: continue it with --resume (same settings, "
               "except max_steps, intervals, device and backend), or start over with --overwrite. SIGINT "
               "(Ctrl-C) / SIGTERM save a checkpoint at the current step and exit with 130 / 143.")
    p.add_argument("--config", help="YAML config file, or the name of a built-in one (default, tiny); "
                                    "default: `default`, or the checkpoint's config with --resume")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--out-dir", help="run directory (default: train.out_dir of the config; with --resume DIR: DIR)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", choices=[b for b in BACKENDS if b])
    p.add_argument("--optimizer", choices=["adamw", "deep_momentum"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                      help="continue the run in this run directory (or from this checkpoint file, in its "
                           "directory); no value: the run in --out-dir")
    mode.add_argument("--overwrite", action="store_true",
                      help="start over in --out-dir even if it holds a run (deletes its checkpoint, config, "
                           "metrics and run.json)")
    p.add_argument("--compile", action="store_true", help="train torch.compile(model, fullgraph=True)")
    p.add_argument("--stop-at", type=int, help="stop at this step (with a checkpoint) without changing the schedule")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set model.dim=128 (repeatable)")
    p.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of a progress bar (the default when output is not a terminal)")
    return p, p.parse_args(argv)


def config_from_args(args, base: Optional[dict] = None) -> RunConfig:
    """The --config file (or `base`, e.g. a checkpoint's config), then the command-line overrides."""
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("out_dir", "train.out_dir"),
                      ("batch_size", "train.batch_size"), ("lr", "train.lr"), ("device", "train.device"),
                      ("backend", "train.backend"), ("optimizer", "train.optimizer")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.no_progress:
        overrides.append("train.progress=false")
    path = args.config if args.config is not None or base is not None else "default"
    return RunConfig.load(path, overrides, base=None if args.config is not None else base)


def main(argv: Optional[List[str]] = None) -> int:
    parser, args = parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.resume is None:
            cfg = config_from_args(args)
            res = train(cfg, stop_at=args.stop_at, overwrite=args.overwrite, compile=args.compile)
        else:
            path = args.resume
            if path == "auto":
                path = args.out_dir or config_from_args(args).train.out_dir
            ckpt_file = resolve_checkpoint_path(path)
            run_dir = ckpt_file.parent
            if args.out_dir is None:
                args.out_dir = str(run_dir)       # continue in DIR, not in the out_dir saved inside
            with RunLock(args.out_dir) if is_main else contextlib.nullcontext():   # before reading the run
                ckpt = load_checkpoint(ckpt_file, for_resume=True)
                if Path(args.out_dir).resolve() != run_dir.resolve():
                    refuse_existing(Path(args.out_dir))   # a branch of the run must not land on another run
                cfg = config_from_args(args, base=ckpt["config"])
                res = train(cfg, resume=ckpt, stop_at=args.stop_at, compile=args.compile)
    except TrainingDiverged as e:
        print(f"hope-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("hope-train: aborted; nothing more was saved (an earlier checkpoint, if any, is kept)",
              file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except (ValueError, TypeError, OSError, RunWriteError) as e:    # a mistake or a full disk: one line
        parser.exit(2, f"{parser.prog}: error: {one_line(e)}\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not is_main:
        return 0
    out = res["out_dir"]
    if res.get("nothing_to_do"):
        print(f"nothing to do: {out} is at step {res['step']} (max_steps {cfg.train.max_steps}"
              + (f", --stop-at {args.stop_at}" if args.stop_at is not None else "")
              + "); raise --max-steps to train further", flush=True)
        return 0
    v = res["val"][-1] if res["val"] else None
    msg = f"step {res['step']}, {res.get('tokens_per_s', 0):,.0f} tokens/s"
    if v is not None:
        msg += f", val loss {v['loss']:.4f}, {v['bpb']:.4f} bits/byte (at step {v['step']})"
    saved = f"checkpoint {res['checkpoint']}" if res["checkpoint"] else "no checkpoint written"
    if res["stopped_by"]:
        print(f"stopped by {res['stopped_by']} at {msg}; {saved}. Continue with: hope-train --resume {out}",
              flush=True)
        return 128 + signal.Signals[res["stopped_by"]]
    print(f"done: {msg}; {saved}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
