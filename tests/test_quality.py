"""The quality suite (benchmarks/quality): the MQAR generator's documented layout, the variant table,
the ablation's block designs, and `python -m benchmarks.quality --quick` end to end (seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.quality.designs import apply_design, selfmod_scan
from benchmarks.quality.mqar import MQARTask, accuracy, accuracy_by_pair
from benchmarks.variants import VARIANTS, available, unsupported, variant
from hope import HOPE
from helpers import rel_err, tolerance

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("num_pairs, seq_len", [(4, 16), (2, 32), (8, 32), (1, 8)])
def test_mqar_layout(num_pairs, seq_len):
    task = MQARTask(num_pairs=num_pairs, seq_len=seq_len)
    x, y = task.batch(64, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (64, seq_len) and x.dtype == y.dtype == torch.long
    K, V = task.num_keys, task.num_values
    keys, values = x[:, 0:2 * num_pairs:2], x[:, 1:2 * num_pairs:2]
    assert ((keys >= 0) & (keys < K)).all() and ((values >= K) & (values < K + V)).all()
    assert all(len(set(row.tolist())) == num_pairs for row in keys)          # distinct keys
    assert (y[:, :2 * num_pairs] == -100).all()                              # no target in the pairs
    for b in range(64):
        pos = (y[b] != -100).nonzero().flatten()
        assert len(pos) == num_pairs and (pos % 2 == 0).all()               # every key once, even offsets
        assert sorted(x[b, pos].tolist()) == sorted(keys[b].tolist())
        for p in pos.tolist():
            i = keys[b].tolist().index(int(x[b, p]))
            assert y[b, p] == values[b, i] == x[b, p + 1]                    # target = its value, shown next
        rest = torch.ones(seq_len, dtype=torch.bool)
        rest[:2 * num_pairs] = False
        rest[pos], rest[pos + 1] = False, False
        assert (x[b, rest] >= K + V).all() and (x[b] < task.vocab_size).all()  # the gap is noise
    again, _ = task.batch(64, torch.Generator().manual_seed(3))
    other, _ = task.batch(64, torch.Generator().manual_seed(4))
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_mqar_rejects_impossible_tasks_and_scores_accuracy():
    with pytest.raises(ValueError, match="seq_len"):
        MQARTask(num_pairs=4, seq_len=15)
    with pytest.raises(ValueError, match="num_pairs"):
        MQARTask(num_pairs=65)
    task = MQARTask(num_pairs=3, seq_len=16)
    x, y = task.batch(8, torch.Generator().manual_seed(0))
    logits = torch.nn.functional.one_hot(y.clamp(min=0), task.vocab_size).float()
    logits[:4] = 0                                     # half the rows wrong (argmax 0 is a key)
    assert accuracy(logits, y) == (12, 24)
    correct, count = accuracy_by_pair(logits, x, y, 3)
    assert count.tolist() == [8, 8, 8] and correct.tolist() == [4, 4, 4]


def test_variant_table_skips_what_hopeconfig_rejects(capsys):
    assert unsupported({"attention": "softmax", "cms": "none"}) is None
    assert "no_such_knob" in unsupported({"no_such_knob": 1})
    names = [v[0] for v in available()]
    assert {"Transformer", "linear attention", "seed HOPE"} <= set(names)
    skipped = [v[0] for v in VARIANTS if v[0] not in names]
    out = capsys.readouterr().out
    assert all(f"skipping variant {n!r}" in out for n in skipped)
    with pytest.raises(ValueError, match="unknown variant"):
        available(["Transformer", "nope"])


def test_cms_design_fields_build_the_ablation_cells():
    """Every ablation cell builds; its CMS is the layer its design fields name (defaults: the model's CMS)."""
    from benchmarks.quality.ablation import BASE, CELLS, SEED_HOPE
    from benchmarks.quality.designs import build_model, design_config
    for name, overrides, *_ in CELLS:
        fields = {**BASE, **SEED_HOPE, **overrides, "vocab_size": 32, "max_seq_len": 16}
        cfg, cms = design_config(fields), build_model(fields, 0).blocks[0].cms
        assert (cms is None) == (cfg["cms"] != "multiscale"), name
        if cms is not None:
            assert cms.update == cfg["cms_update"], name
            assert (cms.conv is None) == (cfg["cms_conv_size"] == 1), name
            assert (cms.out_gate is None) == (not cfg["cms_gated_readout"]), name
    with pytest.raises(ValueError, match="need cms='multiscale'"):
        build_model({"cms": "levels", "cms_update": "outer"}, 0)


def test_ablation_designs():
    """Gate at 0: the block computes the Transformer block exactly; placements differ from each other."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, dim=32, num_layers=2, num_heads=2, max_seq_len=16, backend="torch")
    x = torch.randint(0, 40, (2, 16))
    hope = HOPE(**cfg, cms="multiscale")
    plain = HOPE(**cfg, cms="none")
    plain.load_state_dict({k: v for k, v in hope.state_dict().items() if "cms" not in k})
    gated = apply_design(HOPE(**cfg, cms="multiscale"), gate="channel")
    gated.load_state_dict(hope.state_dict(), strict=False)
    assert torch.allclose(gated(x)[0], plain(x)[0], atol=1e-6)
    outs = {}
    for placement in ("serial", "parallel", "after_mlp", "before_attn"):
        m = apply_design(HOPE(**cfg, cms="multiscale"), placement=placement)
        m.load_state_dict(hope.state_dict())
        outs[placement] = m(x)[0]
    assert torch.allclose(outs["serial"], hope(x)[0], atol=1e-6)   # "serial" is the seed block
    vals = list(outs.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(vals) for b in vals[i + 1:])
    with pytest.raises(ValueError, match="placement"):
        apply_design(hope, placement="sideways")


@pytest.mark.parametrize("period, T", [(1, 7), (3, 7), (8, 7)])
def test_selfmod_design_scan_equals_the_op(period, T):
    """The designs' torch scan at its defaults (block-start k, v; vhat targets) is titans_selfmod_scan."""
    from hope_kernels import titans_selfmod_scan
    torch.manual_seed(0)
    B, H, D = 2, 2, 4
    q = F.normalize(torch.randn(B, T, H, D, dtype=torch.float64), dim=-1)
    u = torch.randn(B, T, H, D, dtype=torch.float64)
    lr_bias, decay_bias = torch.randn(H, dtype=torch.float64), torch.randn(H, dtype=torch.float64) + 2
    M0 = 0.5 * torch.randn(B, H, D, 3 * D + 2, dtype=torch.float64)
    o, M = titans_selfmod_scan(q, u, lr_bias, decay_bias, None, 1.0, lr_max=1.0, period=period, initial_state=M0,
                               output_final_state=True, backend="torch")
    o2, M2 = selfmod_scan(q, u, lr_bias, decay_bias, 1.0, period, M0)
    assert rel_err(o2, o) < tolerance(torch.float64, "cpu") and rel_err(M2, M) < tolerance(torch.float64, "cpu")


def test_selfmod_designs():
    """Static k, v (initialised from M_k, M_v) and writing v into M_mem = I change nothing inside the first
    block and change the model from the second block on; the orthogonal init gives two distinct
    orthogonal M_k, M_v; every parameter of a patched model gets a finite, non-zero gradient."""
    cfg = dict(vocab_size=40, dim=32, num_layers=2, num_heads=2, max_seq_len=16, backend="torch",
               attention="titans", self_modifying=True, titans_period=8, cms="levels", cms_periods=[4, 8])
    x = torch.randint(0, 40, (2, 16))
    torch.manual_seed(0)
    base = apply_design(HOPE(**cfg), selfmod={"init": "orthogonal"})
    layer = base.blocks[0].attn
    D = layer.head_dim
    M_k, M_v = layer.initial_memory[..., :D].detach(), layer.initial_memory[..., D:2 * D].detach()
    eye = torch.eye(D).expand_as(M_k)
    assert rel_err(M_k.transpose(-1, -2) @ M_k, eye) < 1e-5 and rel_err(M_v.transpose(-1, -2) @ M_v, eye) < 1e-5
    assert rel_err(M_k, M_v) > 0.5
    ref = base(x)[0]
    for design in ({"kv": "static"}, {"values": "v"}):
        m = apply_design(HOPE(**cfg), selfmod=design)
        m.load_state_dict(base.state_dict(), strict=False)
        if "kv" in design:
            for b, mb in zip(base.blocks, m.blocks):
                with torch.no_grad():
                    mb.attn.design_kv.copy_(torch.stack([b.attn.initial_memory[..., :D], b.attn.initial_memory[..., D:2 * D]]))
        out = m(x)[0]
        assert rel_err(out[:, :8], ref[:, :8]) < 1e-5, design
        assert rel_err(out[:, 8:], ref[:, 8:]) > 1e-4, design
        _, loss = m(x, x.roll(-1, 1))
        loss.backward()
        bad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or not p.grad.abs().sum() > 0]
        assert not bad, (design, bad)
    with pytest.raises(ValueError, match="kv"):
        apply_design(HOPE(**cfg), selfmod={"kv": "dynamic"})
    with pytest.raises(ValueError, match="self-modifying"):
        apply_design(HOPE(**dict(cfg, self_modifying=False)), selfmod={})


def test_quick_suite_end_to_end(tmp_path):
    """`--quick` writes every output, softmax attention learns the easy setting (chance 1/8), and every
    variant's byte LM is at least one bit below uniform (8 bits) after its 20 steps. Measured on seeds
    0-4, AVX2 and default float paths: the Transformer's MQAR accuracy 1.000 at 150 steps (0.83-1.0
    at 50); LM 6.2-6.5 bits/byte for the Transformer, seed and paper HOPE, 7.7 for every variant at lr 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("quality.csv", "quality.json", "table.txt", "summary.md", "mqar_accuracy.png",
                 "mqar_curves.png", "lm_curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / "quality.json").read_text())
    for v, _, tasks in available(verbose=False, tasks=("mqar", "lm")):
        assert {r["task"] for r in records if r["variant"] == v} == set(tasks), v
        assert v in (tmp_path / "table.txt").read_text()
    easy = [r for r in records if r["task"] == "mqar" and r["variant"] == "Transformer"
            and (r["num_pairs"], r["seq_len"], r["dim"]) == (1, 8, 32)]
    assert easy and all(r["accuracy"] >= 0.9 for r in easy), [r["accuracy"] for r in easy]
    lm = {r["variant"]: r["bpb"] for r in records if r["task"] == "lm"}
    assert all(1.0 < bpb < 7.0 for bpb in lm.values()), lm
    assert all(r["curve"] and r["params"] > 0 and r["wall_s"] > 0 for r in records)


def test_cms_short_convolution_is_causal_and_optional():
    """The default CMS block: its q, k, v see the last cms_conv_size tokens, never later ones."""
    from hope.cms import CMSLayer
    torch.manual_seed(0)
    layer = CMSLayer(32, 2, 3, backend="torch")
    x = torch.randn(2, 12, 32)
    y = x.clone()
    y[:, 7:] = torch.randn(2, 5, 32)                       # change the future of position 6
    a, b = layer(x), layer(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])
    z = x.clone()
    z[:, 3] = torch.randn(2, 32)                           # position 3 reaches 3..6 through the conv, and on
    assert not torch.allclose(layer(z)[:, 4], a[:, 4])
    assert layer.conv is not None and CMSLayer(32, 2, 3, conv_size=1).conv is None
    with pytest.raises(ValueError, match="conv_size"):
        CMSLayer(32, 2, 3, conv_size=0)


def test_cms_update_rules():
    """The default CMS write is the delta rule: writing the same (k, v) twice does not double
    what a key reads (the "outer" rule adds it again), and a bad rule name is a clear error."""
    from hope import HOPEConfig
    from hope.cms import CMSLayer
    torch.manual_seed(0)
    reads = {}
    for update in ("delta", "outer"):
        layer = CMSLayer(16, 1, 1, conv_size=1, gated_readout=False, tau_min=0.9, tau_max=0.9,
                         update=update, backend="torch")
        with torch.no_grad():
            layer.proj.weight.copy_(torch.eye(16))
            if layer.beta is not None:
                layer.beta.bias.fill_(20.0)             # beta = 1: a full step (exact overwrite for unit keys)
                layer.beta.weight.zero_()
        x = torch.randn(1, 1, 16).expand(1, 3, 16).contiguous()   # the same token three times
        reads[update] = layer(x)[0].norm(dim=-1)
    grow = lambda r: (r[2] / r[0]).item()
    # delta, unit key, beta = 1: k S_t = (tau - 1) k S_{t-1} + v, so the read goes v, 0.9 v, 0.91 v
    assert abs(grow(reads["delta"]) - 0.91) < 1e-3, reads["delta"]
    # outer: k S_t = tau k S_{t-1} + (1 - tau) v: 1, 1.9, 2.71 times the first read
    assert abs(grow(reads["outer"]) - 2.71) < 1e-3, reads["outer"]
    with pytest.raises(ValueError, match="update"):
        CMSLayer(16, 1, 1, update="hebb")
    with pytest.raises(ValueError, match="cms_update='hebb': this field was removed"):
        HOPEConfig.from_dict({"cms_update": "hebb"})


def test_variant_names_can_be_listed_on_the_command_line():
    """--variants splits on commas and takes a name or a key; each resolves to its own variant."""
    assert all("," not in name for name, _, _ in VARIANTS)
    assert len({v.key for v in VARIANTS}) == len({v.name for v in VARIANTS}) == len(VARIANTS)
    assert all(variant(v.name) is v and variant(v.key) is v for v in VARIANTS)
    assert variant("seed-hope").name == "seed HOPE"
    with pytest.raises(ValueError, match="unknown variant"):
        variant("seed")


# ---------------------------------------------------------------------- Zoology MQAR and the needle task
from benchmarks.quality.mqar import ZoologyMQAR  # noqa: E402
from benchmarks.quality.niah import NeedleTask  # noqa: E402


@pytest.mark.parametrize("seq_len, num_pairs", [(64, 4), (128, 8), (16, 4)])
def test_zoology_mqar_layout(seq_len, num_pairs):
    """Keys in [1, V/2) and values in [V/2, V), each distinct within a sequence; every key queried once
    at an even offset of the query region, the target there its value, blanks (0) everywhere else."""
    task = ZoologyMQAR(num_pairs=num_pairs, seq_len=seq_len, vocab=8192)
    x, y = task.batch(128, torch.Generator().manual_seed(1))
    N, half = num_pairs, 4096
    assert x.shape == y.shape == (128, seq_len) and x.dtype == y.dtype == torch.long
    keys, values = x[:, 0:2 * N:2], x[:, 1:2 * N:2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 8192)).all()
    assert all(len(set(k.tolist())) == N and len(set(v.tolist())) == N for k, v in zip(keys, values))
    assert (y[:, :2 * N] == -100).all()
    for b in range(128):
        pos = (y[b] != -100).nonzero().flatten()
        assert len(pos) == N and ((pos - 2 * N) % 2 == 0).all()
        assert sorted(x[b, pos].tolist()) == sorted(keys[b].tolist())            # each key once
        for p in pos.tolist():
            i = keys[b].tolist().index(int(x[b, p]))
            assert y[b, p] == values[b, i] and x[b, p + 1] == 0 if p + 1 < seq_len else True
        blank = torch.ones(seq_len, dtype=torch.bool)
        blank[:2 * N], blank[pos] = False, False
        assert (x[b, blank] == 0).all()
    noisy, _ = ZoologyMQAR(num_pairs, seq_len, random_non_queries=True).batch(128, torch.Generator().manual_seed(1))
    assert (noisy[:, 2 * N:] != 0).float().mean() > 0.99 and torch.equal(noisy[:, :2 * N], x[:, :2 * N])


def test_zoology_mqar_query_gaps_follow_the_power_law():
    """One pair: the query's slot g has p(g) ~ (g + 1)^(a - 1); a = 1 is uniform."""
    S, n = 31, 20_000
    for a in (0.01, 1.0):
        x, y = ZoologyMQAR(num_pairs=1, seq_len=64, power_a=a).batch(n, torch.Generator().manual_seed(2))
        slot = ((y != -100).nonzero()[:, 1] - 2) // 2
        p = torch.arange(1, S + 1, dtype=torch.float64) ** (a - 1)
        p /= p.sum()
        freq = torch.bincount(slot, minlength=S).double() / n
        assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max(), (a, freq[:4], p[:4])


def test_zoology_mqar_and_needle_reject_impossible_tasks():
    with pytest.raises(ValueError, match="seq_len"):
        ZoologyMQAR(num_pairs=4, seq_len=15)
    with pytest.raises(ValueError, match="seq_len"):
        ZoologyMQAR(num_pairs=4, seq_len=12)
    with pytest.raises(ValueError, match="vocab"):
        ZoologyMQAR(num_pairs=4, seq_len=64, vocab=64)
    with pytest.raises(ValueError, match="seq_len"):
        NeedleTask(seq_len=8, num_needles=4)
    with pytest.raises(ValueError, match="num_needles"):
        NeedleTask(seq_len=128, num_needles=33)


@pytest.mark.parametrize("seq_len, needles", [(32, 1), (33, 4), (128, 4)])
def test_needle_layout(seq_len, needles):
    """Needles "k v" at even positions in filler, distinct keys; the last token one of them; the
    only target its value; the depth its position over T - 1."""
    task = NeedleTask(seq_len=seq_len, num_needles=needles)
    x, y, depth = task.batch(64, torch.Generator().manual_seed(5))
    K, V = task.num_keys, task.num_values
    assert (y[:, :-1] == -100).all() and ((y[:, -1] >= K) & (y[:, -1] < K + V)).all()
    for b in range(64):
        where = (x[b, :-1] < K).nonzero().flatten()                 # key tokens before the query
        assert len(where) == needles and (where % 2 == 0).all() and len(set(x[b, where].tolist())) == needles
        assert ((x[b, where + 1] >= K) & (x[b, where + 1] < K + V)).all()
        rest = torch.ones(seq_len - 1, dtype=torch.bool)
        rest[where], rest[where + 1] = False, False
        assert (x[b, :-1][rest] >= K + V).all() and (x[b] < task.vocab_size).all()
        asked = int(where[(x[b, where] == x[b, -1]).nonzero()[0, 0]])
        assert y[b, -1] == x[b, asked + 1] and abs(depth[b] - asked / (seq_len - 1)) < 1e-12


def test_answer_forward_is_the_model_loss():
    """answer_forward's loss and gradients equal model(tokens, targets)'s (the output layer applied to
    the answer positions only)."""
    from benchmarks.quality.train import answer_forward
    task = ZoologyMQAR(num_pairs=2, seq_len=16, vocab=64)
    x, y = task.batch(4, torch.Generator().manual_seed(0))
    for ov in ({"attention": "softmax", "use_cms": False}, {"attention": "titans", "self_modifying": True,
                                                            "use_cms": True, "cms": "levels"}):
        torch.manual_seed(0)
        model = HOPE(vocab_size=64, dim=16, num_layers=2, num_heads=2, max_seq_len=16, backend="torch", **ov)
        _, full = model(x, y)
        gf = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
        logits, sparse = answer_forward(model, x, y)
        gs = torch.autograd.grad(sparse, list(model.parameters()), allow_unused=True)
        assert logits.shape == (int((y != -100).sum()), 64)
        assert torch.allclose(full, sparse, rtol=1e-6, atol=0)
        assert all((a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-7))
                   for a, b in zip(gf, gs))


def test_best_learning_rate_per_cell():
    from benchmarks.quality.plans import best_per_cell
    recs = [{"variant": "A", "seq_len": 64, "num_pairs": 4, "dim": 64, "lr": lr, "accuracy": acc}
            for lr, acc in ((1e-3, 0.4), (1e-2, 0.9), (1e-4, 0.1))]
    recs += [{**recs[0], "dim": 128, "accuracy": 0.7}]
    rows = {r["dim"]: r for r in best_per_cell(recs)}
    assert rows[64]["best_lr"] == 1e-2 and rows[64]["accuracy"] == 0.9 and len(rows[64]["by_lr"]) == 3
    assert rows[128]["best_lr"] == 1e-3 and rows[128]["accuracy"] == 0.7


@pytest.mark.parametrize("plan, files", [
    ("zoology-toy", ("zoology.csv", "zoology.json", "zoology_best.csv", "zoology_mqar.png")),
    ("niah-toy", ("needle.csv", "needle.json", "needle.png"))])
def test_toy_plans_end_to_end(tmp_path, plan, files):
    """The toy plans write every output with one record per (variant, cell, rate) or (variant,
    needles), every evaluation length and depth bin; a rerun resumes without training."""
    from benchmarks.quality.plans import PLANS
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "benchmarks.quality", "--plan", plan, "--variants", "transformer,paper-hope",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in files + ("table.txt", "summary.md", "runs.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / files[1]).read_text())
    p = PLANS[plan]
    if plan.startswith("zoology"):
        assert len(records) == 2 * len(p.cells) * len(p.dims) * len(p.lrs)
        assert {r["lr"] for r in records} == set(p.lrs)
    else:
        assert len(records) == 2 * len(p.needles)
        lengths = {str(f * p.train_len) for f in p.factors}
        assert all(set(r["accuracy_by_length"]) == set(r["accuracy_by_depth"]) == lengths for r in records)
        assert all(0 <= a <= 1 for r in records for a in r["accuracy_by_length"].values())
    assert all(r["curve"] and r["params"] > 0 and {"Transformer", "paper HOPE"} >= {r["variant"]} for r in records)
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already in" in again.stdout
    report = subprocess.run(cmd + ["--report-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and f"report of the {len(records)} of {len(records)} runs" in report.stdout


def test_fit_ends_a_run_whose_weights_stop_being_finite():
    """A diverged run (non-finite weights; or, after the first step, non-finite gates, which the memory ops
    reject) ends with its final entry marked "diverged" and accuracy 0 instead of failing the plan; a healthy
    run carries no such mark; any other ValueError is not taken for divergence."""
    from benchmarks.quality.train import Budget, fit, mqar_accuracy
    task = ZoologyMQAR(num_pairs=2, seq_len=16, vocab=64)
    x, y = task.batch(4, torch.Generator().manual_seed(0))
    budget = Budget(steps=4, batch_size=4, eval_every=2)

    def model_and_eval():
        torch.manual_seed(0)
        m = HOPE(vocab_size=64, dim=16, num_layers=1, num_heads=2, max_seq_len=16, backend="torch",
                 **variant("paper HOPE").overrides)
        return m, (lambda: mqar_accuracy(m, x, y, sparse=True))

    model, evaluate = model_and_eval()
    healthy = fit(model, lambda step: (x, y), budget, evaluate, sparse=True)
    assert healthy["final"]["step"] == 4 and "diverged" not in healthy["final"]
    model, evaluate = model_and_eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    out = fit(model, lambda step: (x, y), budget, evaluate, sparse=True)
    assert out["final"]["diverged"] is True and out["final"]["accuracy"] == 0.0 and out["final"]["step"] == 1

    class Rejects(torch.nn.Module):      # finite weights, a forward that raises from its second step on
        def __init__(self, message):
            super().__init__()
            self.w, self.message, self.calls = torch.nn.Parameter(torch.ones(1)), message, 0

        def forward(self, tokens, targets):
            self.calls += 1
            if self.calls > 1:
                raise ValueError(self.message)
            return None, self.w.sum()

    out = fit(Rejects("lr must lie in [0, inf); got values in [nan, nan]"), lambda step: (x, y), budget,
              lambda: {"accuracy": 0.5})
    assert out["final"] == {"step": 2, "accuracy": 0.5, "diverged": True}
    with pytest.raises(ValueError, match="a user error"):
        fit(Rejects("a user error"), lambda step: (x, y), budget, lambda: {})


def test_diverged_runs_are_scored_not_raised(monkeypatch):
    """train_mqar and train_niah score a diverged run 0 (every pair, length and depth) without evaluating it."""
    from benchmarks.quality import niah, train
    from benchmarks.quality.niah import NeedleTask
    def diverged_fit(*args, **kwargs):
        return {"curve": [], "final": {"step": 1, "accuracy": 0.0, "diverged": True}, "wall_s": 0.0}

    monkeypatch.setattr(train, "fit", diverged_fit)
    monkeypatch.setattr(niah, "fit", diverged_fit)
    budget = train.Budget(steps=1, batch_size=2, eval_every=1, eval_size=4)
    torch.manual_seed(0)
    model = HOPE(vocab_size=64, dim=16, num_layers=1, num_heads=2, max_seq_len=64, backend="torch")
    monkeypatch.setattr(train, "mqar_accuracy", lambda *a, **k: pytest.fail("a diverged run was evaluated"))
    out = train.train_mqar(model, ZoologyMQAR(num_pairs=2, seq_len=16, vocab=64), budget, 0, sparse=True)
    assert out["diverged"] and out["accuracy"] == 0.0 and out["accuracy_by_pair"] == [0.0, 0.0]
    task = NeedleTask(seq_len=16)
    monkeypatch.setattr(niah, "needle_accuracy", lambda *a, **k: pytest.fail("a diverged run was evaluated"))
    out = niah.train_niah(model, task, budget, 0, eval_lengths=[16, 32])
    assert out["diverged"] and out["accuracy_by_length"] == {"16": 0.0, "32": 0.0}
    assert out["accuracy_by_depth"]["32"] == [0.0] * niah.DEPTH_BINS
