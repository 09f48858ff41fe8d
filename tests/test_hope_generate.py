"""Generation: cached (KV cache / recurrent step states) equals recomputing the prefix; sampling knobs."""
import pytest
import torch

from hope import HOPE
from hope.generation import sample_next

TINY = dict(vocab_size=61, dim=32, num_layers=2, num_heads=4, num_memory_modules=3, max_seq_len=64)



@pytest.mark.parametrize("attention, position, cms", [
    ("softmax", "rotary", "multiscale"), ("softmax", "learned", "multiscale"), ("linear", "none", "multiscale"),
    ("linear", "none", "none"),
])
def test_greedy_cached_equals_recompute(attention, position, cms):
    model = HOPE(**TINY, attention=attention, position=position, cms=cms, backend="torch")
    prompt = torch.randint(0, 61, (3, 7))
    cached = model.generate(prompt, max_new_tokens=24, temperature=0.0)
    full = model.generate(prompt, max_new_tokens=24, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 31)
    assert torch.equal(cached, full)
    # and the cached logits themselves match the full forward pass
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(cached[:, :7], cache=cache)[0]] + \
                [model(cached[:, t:t + 1], cache=cache)[0] for t in range(7, 30)]
        ref = model(cached[:, :30])[0]
    assert torch.allclose(torch.cat(steps, 1), ref, atol=1e-5, rtol=1e-4)


def test_greedy_cached_on_triton_interpreter():
    """The Triton step kernels (linear_attention_step, cms_step) generate what the torch backend
    generates (whose cached output equals recomputation, above). Short: the interpreter is slow."""
    model = HOPE(**TINY, attention="linear", backend="triton")
    prompt = torch.randint(0, 61, (2, 5))
    a = model.generate(prompt, max_new_tokens=4, temperature=0.0)
    b = model.set_backend("torch").generate(prompt, max_new_tokens=4, temperature=0.0)
    assert torch.equal(a, b)


def test_sampling_knobs_and_prompts():
    model = HOPE(**TINY, backend="torch")
    g = torch.Generator().manual_seed(0)
    one = model.generate([1, 2, 3], max_new_tokens=5, temperature=0.8, top_k=5, top_p=0.9, generator=g)
    assert one.shape == (8,) and one[:3].tolist() == [1, 2, 3]
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.generate([[1, 2], [3, 4]], 6, generator=g1), model.generate([[1, 2], [3, 4]], 6, generator=g2))
    with pytest.raises(ValueError, match="same length"):
        model.generate([[1, 2], [3]], 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1], 3, temperature=-1.0)
    assert model.training  # generate restores the mode


def test_eos_stops_each_sequence():
    model = HOPE(**TINY, backend="torch")
    prompt = torch.randint(0, 61, (2, 4))
    greedy = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    eos = int(greedy[0, 6])                      # the third token row 0 generates
    out = model.generate(prompt, max_new_tokens=12, temperature=0.0, eos_token_id=eos)
    first = (greedy[:, 4:] == eos).float().argmax(1)
    hit = (greedy[:, 4:] == eos).any(1)
    for b in range(2):
        if hit[b]:
            n = int(first[b])
            assert torch.equal(out[b, :4 + n + 1], greedy[b, :4 + n + 1])
            assert (out[b, 4 + n:] == eos).all()
        else:
            assert torch.equal(out[b], greedy[b, :out.shape[1]])
    if hit.all():
        assert out.shape[1] == 4 + int(first.max()) + 1     # stops once every sequence is done


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {3, 4}
    p = torch.softmax(logits[0], 0)                        # 0.636, 0.234, 0.086, ...
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {3, 4}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {4}
    assert p[4] > 0.5
    assert torch.equal(sample_next(logits[:3], 0.0), torch.full((3,), 4))
    freq = (sample_next(logits, 1.0, generator=g) == 4).float().mean()
    assert abs(freq - p[4]) < 0.04
