"""hope.hf: HOPE as a Hugging Face transformers model. generate() gives HOPE.generate's tokens for every
variant (greedy and sampled, with and without a cache); save_pretrained / from_pretrained round-trips
exactly; the run <-> Hugging Face converter keeps a trained run's bits/byte."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the hf extra (transformers, safetensors) is not installed")
pytest.importorskip("safetensors", reason="the hf extra (transformers, safetensors) is not installed")

from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

import hope.hf as hf  # noqa: E402
from hope import HOPE, HOPEConfig  # noqa: E402
from hope import train as hope_train  # noqa: E402
from hope.evaluate import evaluate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "hope" / "configs"
SMALL = dict(vocab_size=61, dim=32, num_layers=2, num_heads=4, max_seq_len=64)
# the configs' tiny variants, shrunk; periods short enough that prompt + generation cross block starts
VARIANTS = {
    "seed": ("tiny.yaml", {}),
    "paper": ("hope_paper_tiny.yaml", dict(titans_period=4, cms_periods=[3, 8])),
    "attention": ("hope_attention_tiny.yaml", dict(cms_periods=[3, 8])),
    "attention_mlp_levels": ("hope_attention_tiny.yaml", dict(cms_periods=[3, 8], cms_memory="mlp")),
    "titans": ("tiny.yaml", dict(attention="titans", position="none", titans_period=4)),
    "linear": ("tiny.yaml", dict(attention="linear", position="none")),
}


def make(variant: str, **fields) -> HOPE:
    name, over = VARIANTS[variant]
    cfg = HOPEConfig.from_yaml(str(CONFIGS / name))
    return HOPE(HOPEConfig.from_dict({**cfg.to_dict(), **SMALL, **over, **fields}), backend="torch").eval()


def count_forward_tokens(model: HOPE) -> list:
    """Records the number of tokens of every forward call of `model`."""
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0].shape[1]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_matches_hope_generate(variant):
    model = make(variant, num_layers=1)     # one block: the cache of several is tested below
    model_hf = hf.to_hf(model).eval()
    prompt = torch.randint(0, 61, (2, 5))
    new = 7
    seen = count_forward_tokens(model_hf.model)
    for use_cache in (True, False):
        seen.clear()
        greedy = model.generate(prompt, new, temperature=0.0, use_cache=use_cache)
        got = model_hf.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache)
        assert torch.equal(got, greedy), (use_cache, got, greedy)
        # with a cache, each step runs the new token only; without, the whole sequence
        assert seen == ([5] + [1] * (new - 1) if use_cache else list(range(5, 5 + new))), seen
        torch.manual_seed(use_cache)
        want = model.generate(prompt, new, temperature=1.3, top_k=20, top_p=0.9, use_cache=use_cache)
        torch.manual_seed(use_cache)
        got = model_hf.generate(prompt, max_new_tokens=new, do_sample=True, temperature=1.3, top_k=20, top_p=0.9,
                                use_cache=use_cache)
        assert torch.equal(got, want), (use_cache, got, want)
        assert not torch.equal(got[:, 5:], greedy[:, 5:])            # it sampled


def test_cache_holds_every_layer_state_and_follows_beams():
    model_hf = hf.to_hf(make("paper")).eval()
    x = torch.randint(0, 61, (3, 7))
    out = model_hf(x, use_cache=True)
    cache = out.cache
    assert isinstance(cache, hf.HOPEHFCache) and cache.get_seq_length() == 7 and len(cache) == 2
    assert all(layer.state for layer in cache.layers)                # each block wrote its state
    step = model_hf(x[:, :1], cache=cache).logits
    full = model_hf(torch.cat([x, x[:, :1]], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    # beam search reorders the batch rows of every state: cached and uncached beams agree
    prompt = x[:2, :5]
    a = model_hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=True)
    b = model_hf.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="HOPEHFCache"):
        model_hf(x, cache=DynamicCache())
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_loss_is_transformers_causal_lm_loss():
    model_hf = hf.to_hf(make("seed")).train()
    x = torch.randint(0, 61, (2, 10))
    labels = x.clone()
    labels[0, 3:6] = -100
    out = model_hf(x, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    summed = model_hf(x, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(summed, want * (labels[:, 1:] != -100).sum() / 7)
    assert out.cache is None                                         # training mode: no cache by default
    out.loss.backward()
    assert model_hf.model.embed.tok.weight.grad is not None
    with pytest.raises(ValueError, match="labels must have the shape"):
        model_hf(x, labels=labels[:, 1:])
    with pytest.raises(TypeError, match="unexpected argument"):
        model_hf(x, position_ids=torch.arange(10))


def test_attention_mask_right_padding_only_without_cache():
    model_hf = hf.to_hf(make("linear")).eval()
    x = torch.randint(0, 61, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0                                                  # right padding: fine without a cache
    padded = model_hf(x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(padded[1, :5], model_hf(x[1:, :5], use_cache=False).logits[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="with a cache"):
        model_hf(x, attention_mask=mask, use_cache=True)
    left = mask.flip(1)
    with pytest.raises(ValueError, match="pad on the right only"):
        model_hf(x, attention_mask=left, use_cache=False)
    with pytest.raises(ValueError, match="padding"):
        model_hf.generate(x, attention_mask=left, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model_hf(x, attention_mask=mask[:, :4], use_cache=False)


@pytest.mark.parametrize("variant", ["seed", "paper"])
def test_save_pretrained_round_trip(tmp_path, variant):
    model = make(variant)
    model_hf = hf.to_hf(model)
    model_hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).to_hope_config() == model.config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, backend="torch")
    assert type(loaded) is hf.HOPEForCausalLM and not loaded.training
    assert loaded.model.head.weight is loaded.model.embed.tok.weight   # still tied
    want = dict(model.named_buffers()) | dict(model.named_parameters())
    got = dict(loaded.model.named_buffers()) | dict(loaded.model.named_parameters())
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), \
        [k for k in want if not torch.equal(want[k], got[k])]
    x = torch.randint(0, 61, (2, 11))
    # without the cache: a cached prefill (the HF default) runs the block-wise cache path, equal to the
    # uncached forward only to float32 rounding (tests/test_hope_generate.py); the weights must be exact
    assert torch.equal(loaded(x, use_cache=False).logits, model(x)[0])
    back = hf.from_hf(loaded)
    assert type(back) is HOPE and back.config == model.config
    assert torch.equal(back(x)[0], model(x)[0])
    with pytest.raises(TypeError, match="hope.HOPE"):
        hf.to_hf(loaded)
    with pytest.raises(TypeError, match="HOPEForCausalLM"):
        hf.from_hf(model)


def test_converted_run_evaluates_to_the_same_bits_per_byte(tmp_path):
    """A tiny hope-train run -> Hugging Face folder (in process) -> run again (the command, in a fresh
    process that loads the folder offline through AutoModelForCausalLM)."""
    run, folder, back = tmp_path / "run", tmp_path / "hf", tmp_path / "back"
    sets = ["train.backend=torch", "model.dim=32", "data.max_bytes=50000", "train.seq_len=32",
            "train.batch_size=4", "train.eval_batches=1", "train.warmup_steps=1"]
    args = ["--config", "tiny", "--out-dir", str(run), "--max-steps", "3", "--no-progress"]
    assert hope_train.main(args + [a for s in sets for a in ("--set", s)]) == 0
    assert hf.main(["convert", str(run), str(folder)]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "hope.hf", "convert", "--to-run", str(folder), str(back)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a = evaluate(run, backend="torch", batches=2, max_new_tokens=8)
    b = evaluate(back, backend="torch", batches=2, max_new_tokens=8)
    assert a["bpb"] == b["bpb"] and a["step"] == b["step"] == 3 and a["sample"] == b["sample"]
    with pytest.raises(SystemExit):                                  # the output must be a new folder
        hf.main(["convert", str(run), str(folder)])
