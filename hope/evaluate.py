"""Evaluate a checkpoint of `hope.train`: `python -m hope.evaluate runs/tiny` (or `hope-evaluate`).

Reports validation loss, bits per byte, perplexity and tokens/s on the run's validation split
(or on other text files with --data), then prints a generated sample.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import torch

from .checkpoint import load_checkpoint, load_model_state
from .data import ByteTokenizer
from .generation import check_max_new_tokens, check_sampling
from .model import HOPE
from .ops import BACKENDS
from .run_config import RunConfig
from .runtime import CommandLine, build_stream, check_backend_runs, evaluate_loss, one_line, pick_device


def evaluate(checkpoint, *, data_files: Optional[List[str]] = None, batches: Optional[int] = None,
             batch_size: Optional[int] = None, device: str = "auto", backend: Optional[str] = None,
             prompt: str = "def ", max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: Optional[int] = 50, top_p: Optional[float] = None, seed: int = 0) -> dict:
    """Metrics of `checkpoint` (path, run directory or loaded dict) plus a generated sample."""
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    check_max_new_tokens(max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty text, got {prompt!r}")
    ckpt = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    base = {k: dict(v) for k, v in ckpt["config"].items()}
    base["train"]["device"] = device
    if data_files:
        base["data"]["files"] = [str(f) for f in data_files]
    cfg = RunConfig.from_dict(base)
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    dev = pick_device(cfg.train.device)
    backend = backend if backend is not None else cfg.train.backend
    check_backend_runs(backend, dev)
    model = HOPE(cfg.model, backend=backend)
    load_model_state(model, ckpt["model"], checkpoint if not isinstance(checkpoint, dict) else "the checkpoint")
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the checkpoint holds non-finite weights (in {bad[:3]}): its run diverged")
    model.to(dev)
    stream = build_stream(cfg)
    trained_on = (ckpt.get("meta") or {}).get("corpus") or {}
    if not data_files and trained_on.get("sha256") not in (None, stream.corpus["sha256"]):
        print(f"note: the corpus differs from the one this checkpoint was trained on (Python "
              f"{trained_on.get('python')} there, {stream.corpus['python']} here): validation reads other text",
              file=sys.stderr)
    metrics = evaluate_loss(model, stream, batch_size or cfg.train.batch_size,
                            batches if batches is not None else cfg.train.eval_batches, dev, cfg.train.amp)
    tok = ByteTokenizer()
    gen = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(torch.tensor(tok.encode(prompt), device=dev), max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    dt = time.perf_counter() - t0
    return {**metrics, "step": int(ckpt["step"]), "corpus": stream.corpus, "sample": tok.decode(out),
            "generate_tokens_per_s": max_new_tokens / max(dt, 1e-9)}


def main(argv: Optional[List[str]] = None) -> int:
    p = CommandLine(prog="hope-evaluate", description="Evaluate a HOPE checkpoint.")
    p.add_argument("checkpoint", help="checkpoint file or run directory (holding ckpt.pt)")
    p.add_argument("--data", nargs="+", help="text files / directories to evaluate on instead of the run's data")
    p.add_argument("--batches", type=int, help="validation batches, >= 1 (default: the run's eval_batches)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", choices=[b for b in BACKENDS if b])
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        r = evaluate(a.checkpoint, data_files=a.data, batches=a.batches, batch_size=a.batch_size,
                     device=a.device, backend=a.backend, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                     temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    except (ValueError, TypeError, OSError) as e:
        p.exit(2, f"{p.prog}: error: {one_line(e)}\n")
    print(f"checkpoint step {r['step']}")
    print(f"validation loss {r['loss']:.4f} nats/byte | {r['bpb']:.4f} bits/byte | "
          f"perplexity {r['ppl']:.2f} | {r['tokens_per_s']:,.0f} tokens/s")
    print(f"sample ({r['generate_tokens_per_s']:,.1f} tokens/s):\n{r['sample']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
