"""Jobs: one (task, variant, seed) training run each, described by a plain dict so that worker
processes can run them; results append to a JSONL file as they finish, and a rerun skips the jobs
already there (an interrupted suite resumes).

    job = {"key": unique str, "task": "mqar" | "zoology" | "niah" | "lm", "task_args": {...},
           "model": {HOPEConfig overrides}, "design": {ablation block design} | None,
           "lr_scale": {...} | None, "budget": {Budget fields}, "seed": int,
           "eval_lengths": [...] (niah), "device": "cpu" (default) | "cuda", **labels}
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Iterable, List, Sequence

import torch

from .designs import apply_design, build_model, design_config
from .lm import lm_stream
from .mqar import make_task
from .niah import NeedleTask, train_niah
from .train import Budget, train_lm, train_mqar


def model_config(job: dict) -> dict:
    """The job's model overrides (designs.build_model): the task fixes vocabulary and context, the job's
    overrides the rest."""
    if job["task"] in ("mqar", "zoology"):
        task = make_task(job["task"], job["task_args"])
        fixed = {"vocab_size": task.vocab_size, "max_seq_len": task.seq_len}
    elif job["task"] == "niah":
        task = NeedleTask(**job["task_args"])
        fixed = {"vocab_size": task.vocab_size, "max_seq_len": max([task.seq_len, *job["eval_lengths"]])}
    else:
        fixed = {"vocab_size": 256, "max_seq_len": job["task_args"]["seq_len"]}
    return {**job["model"], **fixed}


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    model = build_model(model_config(job), job["seed"])
    if job.get("design"):
        apply_design(model, **job["design"])
    if job.get("device", "cpu") != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = True     # the 8,192-way output layer on tensor cores
        os.environ.setdefault("HOPE_KERNELS_AUTOTUNE", "0")    # default configs: no autotuning per process
        model.to(job["device"])
    budget = Budget(**job["budget"])
    if job["task"] in ("mqar", "zoology"):
        out = train_mqar(model, make_task(job["task"], job["task_args"]), budget, job["seed"], job.get("lr_scale"),
                         sparse=job["task"] == "zoology")
    elif job["task"] == "niah":
        out = train_niah(model, NeedleTask(**job["task_args"]), budget, job["seed"], job["eval_lengths"],
                         job.get("lr_scale"))
    else:
        a = job["task_args"]
        out = train_lm(model, lm_stream(a["seq_len"], a["max_bytes"]), budget, job["seed"], job.get("lr_scale"))
    return {**job, "params": model.num_parameters(), "params_non_embedding": model.num_parameters(True),
            **{k: v for k, v in out.items() if k != "final"}, "load_start": load0,
            "load_end": os.getloadavg()[0], "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _summary(r: dict) -> str:
    metric = f"acc {r['accuracy']:.3f}" if "accuracy" in r else f"bpb {r['bpb']:.3f}"
    return f"  {r['key']:<60} {metric}  {r['wall_s']:6.1f}s  load {r['load_end']:.1f}"


def signature(job: dict) -> str:
    """What determines a run's result: the same signature trains the same model on the same batches."""
    what = {k: job.get(k) for k in ("task", "task_args", "design", "lr_scale", "seed")}
    if job.get("eval_lengths"):     # only the needle plan has them: earlier records keep their signatures
        what["eval_lengths"] = job["eval_lengths"]
    model = design_config(model_config(job))
    return json.dumps({**what, "model": model, "budget": Budget(**job["budget"]).__dict__}, sort_keys=True)


def _load(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_all(jobs: Iterable[dict], path: Path, workers: int = 1, verbose: bool = True,
            reuse: Sequence[Path] = ()) -> List[dict]:
    """Run the jobs not yet in `path` (JSONL), `workers` processes at a time; return every record of
    `jobs` (old and new), in the order of `jobs`. A run with the same signature in one of the `reuse`
    files (e.g. the ablation's) is copied into `path` instead of trained again (training is deterministic)."""
    jobs = list(jobs)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"]: r for r in _load(path)}
    known = {signature(r): r for p in reuse for r in _load(Path(p))}
    with open(path, "a") as f:
        for j in jobs:
            if j["key"] not in done and signature(j) in known:
                r = {**known[signature(j)], **j, "reused_from": str(known[signature(j)]["key"])}
                done[j["key"]] = r
                f.write(json.dumps(r) + "\n")
    todo = [j for j in jobs if j["key"] not in done]
    if verbose and len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {path} (or reused); running {len(todo)}")
    with open(path, "a") as f:
        def keep(r):
            done[r["key"]] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            if verbose:
                print(_summary(r), flush=True)
        if workers <= 1 or len(todo) <= 1:
            for j in todo:
                keep(run_job(j))
        else:
            with mp.get_context("spawn").Pool(workers) as pool:
                for r in pool.imap_unordered(run_job, todo):
                    keep(r)
    return [done[j["key"]] for j in jobs]


def finished(jobs: Iterable[dict], path: Path) -> List[dict]:
    """The records of `jobs` already in `path` (JSONL), in the order of `jobs`."""
    done = {r["key"]: r for r in _load(path)}
    return [done[j["key"]] for j in jobs if j["key"] in done]
