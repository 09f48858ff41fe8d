"""The benchmark suite cannot rot: a tiny sweep through `python -m benchmarks`, its files and numbers."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.ops import roofline
from benchmarks.ops.cases import CASES
from benchmarks.ops.roofline import Shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LENS = (16, 32)
TINY = ["--seq-lens", ",".join(map(str, SEQ_LENS)), "--batch", "1", "--heads", "2", "--head-dim", "16",
        "--memories", "2", "--budget-s", "0", "--min-reps", "1", "--threads", "1", "--device", "cpu",
        "--dtype", "float32"]
REL_ERR_BOUND = 1e-4  # float32 inputs against the float64 reference, T = 16


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args, "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_tiny_sweep(tmp_path):
    """One tiny sweep (every op, CPU providers, all modes, plus --model), then its every output.

    One test rather than a module fixture: under pytest-xdist each worker would rerun the sweep."""
    stdout = _run(TINY + ["--providers", "torch,reference,sdpa", "--model"], tmp_path)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    _check_table(stdout)
    _check_rows(rows, data)
    _check_rel_err(rows)
    _check_plots(tmp_path)
    _check_model(tmp_path, data)


def _check_table(stdout):
    assert "p50 ms" in stdout and "rel_err" in stdout
    assert "GPU timings" in stdout  # a CPU run says plainly that GPU numbers need CUDA
    for op in CASES:
        assert op in stdout
    for provider in ("torch", "reference", "sdpa"):
        assert f" {provider} " in stdout


def _check_rows(rows, data):
    assert len(rows) == len(data["rows"]) > 0
    seen = {(r["op"], r["provider"], r["mode"], int(r["T"]), r["metric"]) for r in rows}
    for op, case in CASES.items():
        for provider in ("torch", "reference") + (("sdpa",) if "sdpa" in case.providers else ()):
            for mode in case.modes:
                for t in SEQ_LENS:
                    for metric in ("time", "peak_mem"):
                        assert (op, provider, mode, t, metric) in seen, (op, provider, mode, t, metric)
    for r in rows:
        if r["metric"] == "time":
            p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
            assert 0 < p20 <= p50 <= p80, r
            assert float(r["bytes"]) > 0 and float(r["flops"]) > 0
            assert 0 < float(r["bw_frac"]) and 0 < float(r["flops_frac"])
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__ and r["timestamp"]
    meta = data["meta"]
    assert meta["peak_bw"] > 0 and meta["peak_flops"] > 0 and meta["device_name"]


def _check_rel_err(rows):
    checked = 0
    for r in rows:
        if int(r["T"]) == SEQ_LENS[0] and r["provider"] != "sdpa":
            err = float(r["rel_err"])
            assert math.isfinite(err) and err <= REL_ERR_BOUND, (r["op"], r["provider"], r["mode"], err)
            checked += 1
        elif r["provider"] == "sdpa":
            assert r["rel_err"] == ""  # softmax attention is another model: no error against the reference
    assert checked >= 2 * sum(len(c.modes) for c in CASES.values())


def _check_plots(out):
    for op, case in CASES.items():
        for mode in case.modes:
            path = out / f"{op}_{mode.replace('+', '_')}.png"
            assert path.exists() and path.stat().st_size > 1000, path


def _check_model(out, data):
    model = data["meta"]["model"]
    assert "skipped" not in model, f"model benchmark skipped: {model.get('skipped')}"
    assert {r["attention"] for r in model["throughput"]} == {"softmax", "linear"}, model["notes"]
    for r in model["throughput"]:
        assert r["train_tokens_per_s"] > 0 and r["generate_tokens_per_s"] > 0
    assert {(r["attention"], r["cache"]) for r in model["latency"]} == {
        (a, c) for a in ("softmax", "linear") for c in (True, False)}
    assert all(r["p50_ms"] > 0 for r in model["latency"])
    assert (out / "model_latency.png").exists() and (out / "model_results.csv").exists()


def test_triton_provider_under_interpreter(tmp_path):
    """--interpret runs the Triton kernels through the interpreter on the CPU, with their numerics."""
    _run(["--seq-lens", "16", "--batch", "1", "--heads", "1", "--head-dim", "16", "--memories", "2",
          "--budget-s", "0", "--min-reps", "1", "--threads", "1", "--device", "cpu", "--interpret",
          "--providers", "triton",
          "--ops", "linear_attention,cms_scan_mix,titans_selfmod_scan,linear_attention_step,cms_step,ema_update_",
          "--modes", "fwd,bwd", "--no-plots"], tmp_path)
    with open(tmp_path / "results.json") as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["metric"] == "time"]
    assert {r["provider"] for r in rows} == {"triton"}, data["notes"]
    assert {r["op"] for r in rows} == {"linear_attention", "cms_scan_mix", "titans_selfmod_scan",
                                       "linear_attention_step", "cms_step", "ema_update_"}, data["notes"]
    for r in rows:
        assert math.isfinite(r["rel_err"]) and r["rel_err"] <= REL_ERR_BOUND, r


@pytest.mark.parametrize("op", ["linear_attention", "linear_attention_noncausal", "cms_scan", "cms_scan_mix"])
def test_roofline_bytes_match_the_tensors_of_a_forward(op):
    """The forward bytes of roofline.py are exactly the inputs read plus the output written, plus the
    chunk states written and read (linear attention and the CMS)."""
    s = Shape(B=2, T=48, H=3, K=16, V=8, M=3)
    case = CASES[op]
    inp = case.make(s, torch.bfloat16, torch.device("cpu"), False)
    out = case.call("torch", inp.args)
    read = sum(t.numel() * t.element_size() for n, t in inp.args.items() if n != "decay")
    nbytes, flops = roofline.cost(op, "torch", "fwd", s, torch.bfloat16)
    if op.startswith("linear"):
        states = roofline.la_chunk_state_bytes(s, 2, op == "linear_attention")[0]
    else:
        states = roofline.cms_chunk_state_bytes(s, 2)[0]
    assert nbytes == read + out.numel() * out.element_size() + states
    b_bwd, f_bwd = roofline.cost(op, "torch", "bwd", s, torch.bfloat16)
    assert f_bwd == 2 * flops and b_bwd > nbytes
