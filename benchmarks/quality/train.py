"""One training recipe for every variant: AdamW (torch defaults: betas 0.9/0.999, weight decay 0.01 on
matrices only) at a constant learning rate 1e-3, no clipping, fresh seeded batches every step.
(A cosine decay over 3,000 steps stops even the Transformer before its induction phase change on MQAR:
with it the Transformer stays at 0.27 on the main setting (4 pairs, 16 tokens); warmup / decay / clipping stay available.)

`train_mqar` and `train_lm` take a built model, so a variant is only a HOPEConfig (or, in the
ablation, a block modification); the budget and the hyper-parameters are the same for all.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from hope import HOPE
from hope.runtime import evaluate_loss, lr_factor

from .mqar import pair_counts


@dataclass(frozen=True)
class Budget:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 1.0      # 1: constant learning rate after warmup
    warmup: int = 0
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0
    eval_every: int = 250          # learning-curve points
    eval_size: int = 1024          # MQAR: held-out sequences; LM: validation windows (x batch_size)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimizer(model: torch.nn.Module, budget: Budget,
                   lr_scale: Optional[Dict[str, float]] = None) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only. lr_scale {name substring: factor} multiplies the lr of the
    parameters whose name contains the substring (the ablation's CMS learning rate)."""
    groups: Dict[Tuple[float, float], List[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for s, f in (lr_scale or {}).items() if s in name), 1.0)
        groups.setdefault((scale, budget.weight_decay if p.dim() >= 2 else 0.0), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": budget.lr * s, "base_lr": budget.lr * s, "weight_decay": wd}
                              for (s, wd), ps in groups.items()], lr=budget.lr, betas=budget.betas)


def answer_forward(model: HOPE, tokens: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [M, vocab] at the M positions whose target is not -100, their mean cross entropy): the
    loss of model(tokens, targets), with the output layer applied to the answer positions only (the
    8,192-way output layer of Zoology's MQAR would otherwise cost more than the whole model)."""
    x = model.embed(tokens, 0)
    for block in model.blocks:
        x = block(x, None)
    mask = targets != -100
    logits = model.head(model.norm(x[mask]))
    return logits, torch.nn.functional.cross_entropy(logits.float(), targets[mask])


def fit(model: torch.nn.Module, batches: Callable[[int], Tuple[torch.Tensor, torch.Tensor]], budget: Budget,
        evaluate: Callable[[], dict], lr_scale: Optional[Dict[str, float]] = None, sparse: bool = False) -> dict:
    """Train for budget.steps on batches(step); evaluate() every eval_every steps and at the end.
    sparse: the loss from answer_forward (the same value; for targets that are mostly -100).
    Returns {"curve": [{"step", "train_loss", **evaluate()}], "final": evaluate() at the end, "wall_s"}.
    A run that stops being finite (its loss, its weights, or, after the first step, the gates its memories
    produce, which the ops reject) ends there, its final entry marked "diverged" (accuracy 0 where evaluate()
    cannot run on it)."""
    opt = make_optimizer(model, budget, lr_scale)
    curve, t0, running, count, diverged = [], time.perf_counter(), 0.0, 0, False
    model.train()
    for step in range(budget.steps):
        f = lr_factor(step, budget.warmup, budget.steps, budget.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        x, y = batches(step)
        try:
            _, loss = answer_forward(model, x, y) if sparse else model(x, y)
        except ValueError as e:   # an op rejecting non-finite gates: weights or the in-context memory blew up
            if all(bool(p.isfinite().all()) for p in model.parameters()) and (step == 0 or "nan" not in str(e)):
                raise
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if budget.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        opt.step()
        running, count = running + loss.detach(), count + 1     # read back at evaluations only (no per-step sync)
        if (step + 1) % budget.eval_every == 0 or step + 1 == budget.steps:
            train_loss = float(running) / count
            if not math.isfinite(train_loss):
                diverged = True
                break
            curve.append({"step": step + 1, "train_loss": train_loss, **evaluate()})
            running, count = 0.0, 0
    wall = time.perf_counter() - t0
    if not diverged:
        final = curve[-1] if curve and curve[-1]["step"] == budget.steps else {"step": step + 1, **evaluate()}
        return {"curve": curve, "final": final, "wall_s": wall}
    try:
        final = {"step": step + 1, **evaluate(), "diverged": True}
    except ValueError:
        final = {"step": step + 1, "accuracy": 0.0, "eval_loss": float("nan"), "diverged": True}
    return {"curve": curve, "final": final, "wall_s": wall}


# ---------------------------------------------------------------------- MQAR
EVAL_SEED = 1234     # one held-out MQAR set per task, the same for every variant and seed


@torch.no_grad()
def mqar_accuracy(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                  num_pairs: Optional[int] = None, batch: int = 256, sparse: bool = False) -> dict:
    """Held-out accuracy and loss; with num_pairs also the accuracy per queried pair index
    (sparse: logits at the answer positions only, answer_forward)."""
    was = model.training
    model.eval()
    correct = count = 0
    loss = 0.0
    by_pair = torch.zeros(2, num_pairs or 0, dtype=torch.long)
    for i in range(0, len(tokens), batch):
        x, y = tokens[i:i + batch].to(device_of(model)), targets[i:i + batch].to(device_of(model))
        if sparse:
            logits, l = answer_forward(model, x, y)
            right = torch.zeros(y.shape, dtype=torch.bool)
            right[(y != -100).cpu()] = (logits.argmax(-1) == y[y != -100]).cpu()
        else:
            logits, l = model(x, y)
            right = (logits.argmax(-1) == y).cpu()
        mask = targets[i:i + batch] != -100
        c, n = int(right[mask].sum()), int(mask.sum())
        correct, count, loss = correct + c, count + n, loss + l.item() * n
        if num_pairs:
            by_pair += torch.stack(pair_counts(right, tokens[i:i + batch], targets[i:i + batch], num_pairs))
    model.train(was)
    out = {"accuracy": correct / count, "eval_loss": loss / count}
    if num_pairs:
        out["accuracy_by_pair"] = (by_pair[0] / by_pair[1].clamp(min=1)).tolist()
    return out


def train_mqar(model: torch.nn.Module, task, budget: Budget, seed: int,
               lr_scale: Optional[Dict[str, float]] = None, sparse: bool = False) -> dict:
    """Train on fresh batches of `task` (MQARTask or ZoologyMQAR; generator seeded by `seed`, batches
    drawn on the CPU and moved to the model's device), report accuracy on a fixed held-out set."""
    eval_x, eval_y = task.batch(budget.eval_size, torch.Generator().manual_seed(EVAL_SEED))
    g = torch.Generator().manual_seed(10_000 + seed)
    dev = device_of(model)
    out = fit(model, lambda step: tuple(t.to(dev) for t in task.batch(budget.batch_size, g)), budget,
              lambda: mqar_accuracy(model, eval_x, eval_y, sparse=sparse), lr_scale, sparse)
    out["accuracy"] = out["final"]["accuracy"]
    if out["final"].get("diverged"):
        out.update(diverged=True, accuracy_by_pair=[0.0] * task.num_pairs)
    else:
        out["accuracy_by_pair"] = mqar_accuracy(model, eval_x, eval_y, task.num_pairs, sparse=sparse)["accuracy_by_pair"]
    return out


# ---------------------------------------------------------------------- byte-level LM
def train_lm(model: torch.nn.Module, stream, budget: Budget, seed: int,
             lr_scale: Optional[Dict[str, float]] = None) -> dict:
    """Train on random windows of the stream's train split; validation bits/byte on its first
    budget.eval_size windows (hope.runtime.evaluate_loss), the same windows for every variant."""
    stream.seed, stream.position = seed, 0
    dev = torch.device("cpu")
    n_batches = max(1, budget.eval_size // budget.batch_size)
    out = fit(model, lambda step: stream.next_batch(budget.batch_size), budget,
              lambda: {"bpb": evaluate_loss(model, stream, budget.batch_size, n_batches, dev, False)["bpb"]},
              lr_scale)
    out["bpb"] = out["final"]["bpb"]
    return out
