"""HOPE / HOPEConfig: the seed API, forward/backward, backends, YAML, weight tying, init, errors."""
import pytest
import torch

from benchmarks.quality.designs import build_model
from hope import HOPE, HOPEConfig
from helpers import assert_close

TINY = dict(vocab_size=97, dim=32, num_layers=2, num_heads=4, num_memory_modules=3, max_seq_len=64)



@pytest.fixture
def torch_default_backend(monkeypatch):
    """The seed snippet names no backend: route its default to the fast CPU path (not the interpreter)."""
    monkeypatch.setenv("HOPE_KERNELS_BACKEND", "torch")


def test_seed_snippet_small(torch_default_backend):
    """The seed snippet of DESIGN.md with small sizes (same keywords, same calls)."""
    model = HOPE(vocab_size=320, dim=32, num_layers=2, num_heads=4, num_memory_modules=5, use_cms=True)
    tokens = torch.randint(0, 320, (2, 16))
    targets = torch.randint(0, 320, (2, 16))
    prompt = torch.randint(0, 320, (1, 4))
    logits, loss = model(tokens, targets)        # loss is None without targets
    out = model.generate(prompt, max_new_tokens=50, temperature=0.8, top_k=None)
    assert logits.shape == (2, 16, 320) and loss.dim() == 0 and torch.isfinite(loss)
    assert model(tokens)[1] is None
    assert out.shape == (1, 54) and torch.equal(out[:, :4], prompt)
    assert 0 <= out.min() and out.max() < 320


def test_seed_snippet_verbatim_full_size(torch_default_backend):
    """The exact line of the seed API (67M parameters), forward only on a short sequence."""
    model = HOPE(vocab_size=32000, dim=512, num_layers=12, num_heads=8, num_memory_modules=5, use_cms=True)
    tokens = torch.randint(0, 32000, (1, 4))
    targets = torch.randint(0, 32000, (1, 4))
    with torch.no_grad():
        logits, loss = model(tokens, targets)
    assert logits.shape == (1, 4, 32000)
    # GPT-2 style init: the untrained model is close to uniform over the vocabulary
    assert abs(loss.item() - torch.log(torch.tensor(32000.0)).item()) < 0.5


@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("cms", ["multiscale", "none"])
def test_forward_backward(attention, cms):
    model = HOPE(**TINY, attention=attention, cms=cms, backend="torch")
    tokens = torch.randint(0, 97, (2, 20))
    logits, loss = model(tokens, tokens.roll(-1, 1))
    assert logits.shape == (2, 20, 97)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no / non-finite gradient for {missing}"
    # causality: changing a later token leaves earlier logits unchanged
    t2 = tokens.clone()
    t2[:, 12] = (t2[:, 12] + 1) % 97
    with torch.no_grad():
        a, b = model(tokens)[0], model(t2)[0]
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6) and not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_model_backends_agree(attention):
    """Same weights on "triton" (interpreter), "torch" and the float64 references (the CMS without its
    gated read-out: see tests/test_hope_layers.py _layers)."""
    model = build_model({**TINY, "attention": attention, "cms_gated_readout": False}, 0, backend=None)
    ref = build_model({**TINY, "attention": attention, "cms_gated_readout": False}, 0).double().set_backend("reference")
    ref.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 97, (2, 16))
    out_ref = ref(tokens)[0]
    for backend in ("triton", "torch"):
        assert_close(f"{attention} logits on {backend}", model.set_backend(backend)(tokens)[0], out_ref,
                     torch.float32, "cpu")


def test_config_paths_agree_and_yaml_round_trip(tmp_path):
    cfg = HOPEConfig(**TINY, attention="linear", cms_learn_tau=False)
    path = tmp_path / "model.yaml"
    cfg.to_yaml(str(path))
    assert HOPEConfig.from_yaml(str(path)) == cfg
    assert HOPEConfig.from_yaml(cfg.to_yaml()) == cfg
    torch.manual_seed(1)
    a = HOPE(cfg)
    torch.manual_seed(1)
    b = HOPE(**cfg.to_dict())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert HOPE(cfg, num_layers=1).config.num_layers == 1


def test_weight_tying_init_and_parameter_count():
    tied = HOPE(**TINY)
    assert tied.head.weight is tied.embed.tok.weight
    untied = HOPE(**TINY, tie_weights=False)
    assert untied.head.weight is not untied.embed.tok.weight
    V, Dm = TINY["vocab_size"], TINY["dim"]
    assert untied.num_parameters() - tied.num_parameters() == V * Dm
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert tied.num_parameters(non_embedding=True) == tied.num_parameters() - V * Dm
    # GPT-2 init: N(0, 0.02) matrices, residual projections scaled down by sqrt(3 * layers)
    big = HOPE(vocab_size=256, dim=256, num_layers=2, num_heads=4)
    std_fc = big.blocks[0].mlp.fc.weight.std().item()
    std_proj = big.blocks[0].mlp.proj.weight.std().item()
    assert abs(std_fc - 0.02) < 2e-3 and abs(std_proj - 0.02 / 6 ** 0.5) < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "divisible"),
    (dict(dim=-8), "dim"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(attention="flash"), "attention"),
    (dict(position="alibi"), "position"),
    (dict(backend="cuda"), "backend"),
    (dict(cms_tau_min=0.5, cms_tau_max=0.2), "tau"),
    (dict(dropout=1.5), "dropout"),
    (dict(num_memory_modules=0), "num_memory_modules"),
    (dict(nonsense_knob=3), "nonsense_knob"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HOPE(**{**TINY, **kwargs})


def test_bad_inputs():
    model = HOPE(**TINY)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(2, 8))
    with pytest.raises(ValueError, match="targets"):
        model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 7)))
    with pytest.raises(TypeError, match="HOPEConfig"):
        HOPE({"dim": 32})
    with pytest.raises(FileNotFoundError):
        HOPEConfig.from_yaml("no/such/model.yaml")
