"""Configs of an earlier vocabulary keep loading: one mapping (hope.checkpoint.upgrade_model_config)
read by HOPEConfig.from_dict, run configs (checkpoints, hope-evaluate, resume) and hope.hf."""
import dataclasses

import pytest
import torch

from hope import HOPE, HOPEConfig
from hope.checkpoint import load_checkpoint, save_checkpoint, upgrade_model_config
from hope.run_config import RunConfig, TrainConfig

# HOPEConfig.to_dict() as the model of commit 72d4d1b wrote it (35 fields), written out by hand.
EARLIER_SEED = {
    "vocab_size": 256, "dim": 16, "num_layers": 1, "num_heads": 2, "head_dim": None, "mlp_ratio": 4.0,
    "max_seq_len": 32, "attention": "softmax", "position": "rotary", "rope_base": 10000.0,
    "linear_normalize": True, "titans_period": 16, "self_modifying": False, "titans_momentum": False,
    "titans_lr_max": 1.0, "titans_conv": 4, "use_cms": True, "cms": "decay", "cms_periods": [16, 64, 256],
    "cms_memory": "linear", "num_memory_modules": 2, "cms_tau_min": 0.01, "cms_tau_max": 0.99,
    "cms_learn_tau": True, "cms_per_head_tau": True, "cms_data_dependent_mix": True, "cms_conv_size": 4,
    "cms_gated_readout": True, "cms_update": "delta", "dropout": 0.0, "bias": False, "tie_weights": True,
    "norm_eps": 1e-05, "init_std": 0.02, "backend": "torch",
}
SEED = dict(vocab_size=256, dim=16, num_layers=1, num_heads=2, max_seq_len=32, num_memory_modules=2)


def test_earlier_seed_config_is_todays_default_block():
    new = upgrade_model_config(EARLIER_SEED)
    today = HOPEConfig(**SEED).to_dict()
    # fields added since (titans_selfmod_init, titans_mem_period) are absent from the earlier dict and read at
    # their default
    assert new == {k: v for k, v in today.items() if k in new} and new["cms"] == "multiscale"
    assert set(today) - set(new) == {"titans_selfmod_init", "titans_mem_period"} and HOPEConfig.from_dict(new).to_dict() == today
    assert "backend" not in new and "use_cms" not in new
    assert upgrade_model_config(new) == new                     # today's vocabulary passes as is
    assert len(EARLIER_SEED) == 35 and len(dataclasses.fields(HOPEConfig)) == 29


@pytest.mark.parametrize("earlier, fields", [
    (dict(use_cms=False), dict(cms="none")),
    (dict(use_cms=False, cms="levels"), dict(cms="none")),     # use_cms=False dropped the CMS of either kind
    (dict(use_cms=True, cms="levels", titans_lr_max=0.5), dict(cms="levels", titans_lr_max=0.5, cms_lr_max=0.5)),
    (dict(cms="decay", backend="triton"), dict(cms="multiscale")),
    (dict(titans_conv=4, linear_normalize=True), {}),
])
def test_earlier_fields_map(earlier, fields):
    assert HOPEConfig.from_dict({**SEED, **earlier}) == HOPEConfig(**SEED, **fields)
    assert HOPE(**{**SEED, **earlier, "backend": "torch"}).config == HOPEConfig(**SEED, **fields)


@pytest.mark.parametrize("earlier, match", [
    (dict(cms_update="outer"), "cms_update='outer': this field was removed"),
    (dict(cms_conv_size=1), "cms_conv_size=1"), (dict(cms_gated_readout=False), "cms_gated_readout=False"),
    (dict(cms_per_head_tau=False), "cms_per_head_tau"), (dict(cms_data_dependent_mix=False), "cms_data_dependent_mix"),
    (dict(linear_normalize=False), "linear_normalize"), (dict(titans_conv=0), "titans_conv"),
    (dict(use_cms=True, cms="none"), "use_cms=True contradicts cms='none'"), (dict(use_cms=1), "use_cms"),
])
def test_earlier_fields_no_model_builds_are_refused(earlier, match):
    with pytest.raises(ValueError, match=match):
        HOPEConfig.from_dict({**SEED, **earlier})


def test_backend_is_not_a_model_field():
    with pytest.raises(TypeError):
        HOPEConfig(backend="torch")
    model = HOPE(HOPEConfig(**SEED), backend="reference")
    assert model.backend == "reference" and model.blocks[0].cms.backend == "reference"
    model.set_backend("torch")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"torch"}
    assert "backend" not in model.config.to_dict()


def test_checkpoint_of_the_earlier_format_loads_and_evaluates(tmp_path):
    """A checkpoint whose run config is of the earlier vocabulary (model.use_cms, model.backend, no
    train.backend): hope-evaluate and a resume read it as today's run with train.backend set."""
    from hope.evaluate import evaluate
    from hope.train import check_resumable
    torch.manual_seed(0)
    model = HOPE(HOPEConfig(**SEED), backend="torch")
    train = {k: v for k, v in dataclasses.asdict(TrainConfig(seq_len=16, batch_size=2, device="cpu")).items()
             if k != "backend"}
    run = {"model": dict(EARLIER_SEED), "data": {"files": None, "max_bytes": 20000, "val_fraction": 0.1},
           "train": train}
    path = save_checkpoint(tmp_path / "ckpt.pt", {"config": run, "model": model.state_dict(), "step": 3})
    ckpt = load_checkpoint(path)
    cfg = RunConfig.from_dict(ckpt["config"])
    assert cfg.model == HOPEConfig(**SEED) and cfg.train.backend == "torch"
    assert check_resumable(ckpt, cfg) == {}
    out = evaluate(path, batches=1, batch_size=2, device="cpu", max_new_tokens=2)
    assert out["loss"] > 0
    loaded = HOPE(cfg.model, backend=cfg.train.backend)
    loaded.load_state_dict(ckpt["model"])
    tokens = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])


def test_hugging_face_config_of_the_earlier_format():
    pytest.importorskip("transformers")
    from hope.hf import HOPEHFConfig
    hf = HOPEHFConfig(**EARLIER_SEED)
    assert hf.to_hope_config() == HOPEConfig(**SEED) and not hasattr(hf, "use_cms")
    with pytest.raises(ValueError, match="cms_update"):
        HOPEHFConfig(**{**EARLIER_SEED, "cms_update": "outer"})
