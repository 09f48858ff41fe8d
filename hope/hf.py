"""HOPE as a Hugging Face transformers model (the optional extra `hf`: transformers, safetensors).

    import hope.hf                                       # registers model_type "hope" with the Auto classes
    hf_model = hope.hf.to_hf(model)                      # a HOPEForCausalLM with model's weights
    hf_model.save_pretrained("out")                      # config.json + model.safetensors
    hf_model = AutoModelForCausalLM.from_pretrained("out")
    out = hf_model.generate(ids, max_new_tokens=50)      # HOPE.generate's tokens
    model = hope.hf.from_hf(hf_model)                    # back to a plain hope.HOPE

`HOPEForCausalLM.forward` runs `hope.HOPE.forward` unchanged, so its logits are HOPE's. With a cache
(`HOPEHFCache`, holding every block's generation state: KV caches, recurrent and CMS memories,
block-start memories, conv histories, positions) a step feeds only the new tokens, O(1) per token in
the recurrent layers. The loss is transformers' causal LM loss: labels [B, T] are shifted inside
(position t predicts label t + 1) and -100 is ignored.

Padding: the recurrent layers read every position, so a left-padded row would carry its pad tokens
in its memories. `attention_mask` (1 = token, 0 = pad) must therefore be all ones, or, without a
cache, right padding only (each row ones then zeros: causal outputs at the real tokens do not see the
pads after them, as in a right-padded batch for the loss or log-likelihoods). Anything else is refused
with a ValueError.

The converter between a `hope-train` run directory (config.yaml + ckpt.pt) and a Hugging Face folder:

    python -m hope.hf convert RUN_DIR OUT_DIR             # run -> Hugging Face folder
    python -m hope.hf convert --to-run HF_DIR RUN_DIR     # Hugging Face folder -> run (for hope-evaluate)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

try:
    import safetensors  # noqa: F401  (save_pretrained writes safetensors)
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("hope.hf needs transformers and safetensors: pip install 'hope-kernels[hf]' "
                      f"(or pip install transformers safetensors); {e}") from e

from hope_kernels.utils import skip_host_checks

from .checkpoint import CHECKPOINT_NAME, REMOVED_MODEL_FIELDS, load_checkpoint, save_checkpoint
from .config import HOPEConfig
from .generation import HOPECache
from .layers import RotaryEmbedding
from .model import HOPE
from .run_config import RunConfig

# HOPEConfig's fields as carried by the Hugging Face config (the backend is a run-time choice of the
# machine, not of the weights: HOPEForCausalLM(config, backend), from_pretrained(..., backend=...)),
# and the fields of earlier vocabularies that a saved config.json may hold (upgrade_model_config).
HOPE_FIELDS = tuple(f.name for f in dataclasses.fields(HOPEConfig))
EARLIER_FIELDS = ("use_cms", "backend", *REMOVED_MODEL_FIELDS)


class HOPEHFConfig(PretrainedConfig):
    """HOPEConfig's fields (validated by HOPEConfig) as a transformers config, model_type "hope".

    `hope_run` optionally records the `data` / `train` sections, step and metadata of the `hope-train`
    run the weights come from, so the converter can write that run back."""

    model_type = "hope"
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                     "max_position_embeddings": "max_seq_len", "tie_word_embeddings": "tie_weights"}

    def __init__(self, hope_run: Optional[dict] = None, use_cache: bool = True, **kwargs):
        for hf_name, name in self.attribute_map.items():
            if hf_name in kwargs:
                kwargs.setdefault(name, kwargs.pop(hf_name))
        fields = HOPEConfig.from_dict({k: kwargs.pop(k) for k in HOPE_FIELDS + EARLIER_FIELDS if k in kwargs}).to_dict()
        for k in HOPE_FIELDS:
            setattr(self, k, fields[k])
        self.hope_run = hope_run
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=fields["tie_weights"], **kwargs)

    def to_hope_config(self) -> HOPEConfig:
        return HOPEConfig.from_dict({k: getattr(self, k) for k in HOPE_FIELDS})

    @classmethod
    def from_hope_config(cls, config: HOPEConfig, **kwargs) -> "HOPEHFConfig":
        return cls(**config.to_dict(), **kwargs)


def _map_tensors(obj, fn):
    """obj (nested dicts / lists / tuples of tensors and plain values) with fn applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class HOPEBlockCache(CacheLayerMixin):
    """One block's generation state: the dict that `hope.HOPEBlock` keeps (opaque here; every tensor in
    it has the batch as its first dimension). The length is the model's, shared by all blocks."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, state: dict, owner: HOPECache):
        super().__init__()
        self.state, self.owner = state, owner

    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError("HOPE blocks keep their own state; a HOPEHFCache is filled by the model's forward")

    update = lazy_initialization

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_mask_sizes(self, query_length: int):
        return self.owner.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _apply(self, fn) -> None:
        new = _map_tensors(self.state, fn)
        self.state.clear()
        self.state.update(new)   # the same dict object: the model's HOPECache holds it

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a HOPE cache cannot be cropped: its recurrent memories do not keep past states")

    def reset(self) -> None:
        self.state.clear()


class HOPEHFCache(Cache):
    """A transformers Cache over a `hope.HOPECache`: one `HOPEBlockCache` per block (the block's state
    dict, opaque) and the shared length (the position of the next token)."""

    def __init__(self, hope_cache: HOPECache):
        if not isinstance(hope_cache, HOPECache):
            raise TypeError(f"hope_cache must be a hope.HOPECache, got {type(hope_cache).__name__}")
        self.hope = hope_cache
        super().__init__(layers=[HOPEBlockCache(state, hope_cache) for state in hope_cache.layers])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.hope.length

    def reset(self) -> None:
        super().reset()
        self.hope.length = 0


class HOPEPreTrainedModel(PreTrainedModel):
    config_class = HOPEHFConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["HOPEBlock"]
    _is_stateful = True   # recurrent memories: no assisted decoding (no rollback of a step)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """hope.HOPE initialises its weights when built (HOPE._init_weights and each layer's own), and
        loading fills every saved one. What is not saved is recomputed here: from_pretrained builds the
        model on the meta device, so the rotary angles (a non-persistent buffer) would be left unset."""
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(2 * module.inv_freq.numel(), self.config.rope_base).inv_freq
            module.inv_freq.copy_(fresh.to(module.inv_freq.device))


class HOPEForCausalLM(HOPEPreTrainedModel, GenerationMixin):
    """A `hope.HOPE` (`.model`) as a transformers causal LM; see the module docstring. `backend` (also
    a keyword of from_pretrained) is the layers' backend, as in hope.HOPE."""

    _tied_weights_keys = {"model.head.weight": "model.embed.tok.weight"}
    loss_type = "ForCausalLM"
    accepts_loss_kwargs = True
    main_input_name = "input_ids"

    def __init__(self, config: HOPEHFConfig, backend: Optional[str] = None):
        super().__init__(config)
        self.model = HOPE(config.to_hope_config(), backend=backend)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # the model builds its own HOPEHFCache (a DynamicCache cannot hold recurrent states)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed.tok

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed.tok = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.head = value

    def new_cache(self) -> HOPEHFCache:
        return HOPEHFCache(self.model.new_cache())

    def _check_mask(self, attention_mask: torch.Tensor, input_ids: torch.Tensor, past: int, cached: bool) -> None:
        """Ones, or (without a cache) ones then zeros per row; see the module docstring. The values are
        read (a host sync on a GPU) where that is free, and always at the first step of a sequence."""
        B, T = input_ids.shape
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            raise ValueError(f"attention_mask must be [batch, sequence] = [{B}, {T}] (or [{B}, {past + T}] "
                             f"with the cached tokens), got {tuple(attention_mask.shape)}")
        if past and skip_host_checks(attention_mask.device):
            return
        m = attention_mask.bool()
        if bool(m.all()):
            return
        if cached:
            raise ValueError("attention_mask holds padding, which HOPE's recurrent memories cannot skip: with a "
                             "cache (generation) every position must be a token (mask all ones); batch prompts "
                             "of equal length, or generate them one at a time")
        if not bool((m[:, 1:] <= m[:, :-1]).all()):
            raise ValueError("attention_mask must pad on the right only (each row ones, then zeros): HOPE's "
                             "recurrent memories would read left or inner padding; set padding_side='right'")

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: Optional[bool] = None, inputs_embeds: Optional[torch.Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, cache: Optional[Cache] = None,
                num_items_in_batch: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> CausalLMOutputWithPast(loss, logits [B, T, vocab], cache).

        With a cache (`cache`, or `past_key_values`: a HOPEHFCache) input_ids continue the cached
        sequence and the cache is updated in place; use_cache (default: config.use_cache outside
        training) starts one when none is given."""
        if kwargs:
            raise TypeError(f"HOPEForCausalLM.forward got unexpected argument(s) {sorted(kwargs)}")
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        if output_attentions or output_hidden_states:
            raise ValueError("output_attentions / output_hidden_states are not supported by HOPE "
                             "(its memories have no attention maps)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the cache once, as cache or as past_key_values")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None and not isinstance(cache, HOPEHFCache):
            raise TypeError(f"the cache must be a HOPEHFCache (model.new_cache()), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None:
            self._check_mask(attention_mask, input_ids, past, cache is not None)
        logits, _ = self.model(input_ids, cache=None if cache is None else cache.hope)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=num_items_in_batch)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: Optional[Cache] = None,
                                      past_key_values: Optional[Cache] = None,
                                      attention_mask: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                                      inputs_embeds: Optional[torch.Tensor] = None, **kwargs) -> dict:
        """The tokens the cache has not seen yet (all of them without a cache)."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache,
                  "cache": cache}
        for k in ("output_attentions", "output_hidden_states"):
            if kwargs.get(k):
                inputs[k] = kwargs[k]
        return inputs


def to_hf(model: HOPE, hope_run: Optional[dict] = None) -> HOPEForCausalLM:
    """A HOPEForCausalLM holding a copy of `model`'s weights (on its device and dtype, same backend)."""
    if not isinstance(model, HOPE):
        raise TypeError(f"model must be a hope.HOPE, got {type(model).__name__}")
    p = next(model.parameters())
    hf = HOPEForCausalLM(HOPEHFConfig.from_hope_config(model.config, hope_run=hope_run), model.backend)
    hf.to(device=p.device, dtype=p.dtype)
    hf.model.load_state_dict(model.state_dict())
    return hf.train(model.training)


def from_hf(hf_model: HOPEForCausalLM) -> HOPE:
    """A hope.HOPE holding a copy of `hf_model`'s weights (on its device and dtype, same backend)."""
    if not isinstance(hf_model, HOPEForCausalLM):
        raise TypeError(f"hf_model must be a HOPEForCausalLM, got {type(hf_model).__name__}")
    src = hf_model.model
    p = next(src.parameters())
    model = HOPE(src.config, backend=src.backend).to(device=p.device, dtype=p.dtype)
    model.load_state_dict(src.state_dict())
    return model.train(hf_model.training)


AutoConfig.register(HOPEHFConfig.model_type, HOPEHFConfig, exist_ok=True)
AutoModelForCausalLM.register(HOPEHFConfig, HOPEForCausalLM, exist_ok=True)


# ---------------------------------------------------------------------- converter
def _empty_dir(path: Path, what: str) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {path} exists and is not an empty directory; choose a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_to_hf(run_dir, out_dir) -> HOPEForCausalLM:
    """A `hope-train` run directory (or ckpt.pt) -> a Hugging Face folder (config.json, model.safetensors)."""
    ckpt = load_checkpoint(run_dir)
    run = ckpt["config"]
    model = HOPE(HOPEConfig.from_dict(run["model"]))
    model.load_state_dict(ckpt["model"])
    hf = to_hf(model, hope_run={"data": run["data"], "train": run["train"], "step": int(ckpt["step"]),
                                "meta": ckpt.get("meta") or {}})
    hf.save_pretrained(str(_empty_dir(Path(out_dir), "the output folder")))
    return hf


def hf_to_run(hf_dir, run_dir) -> Path:
    """A Hugging Face folder of a HOPEForCausalLM -> a run directory (config.yaml, ckpt.pt) that
    `hope-evaluate` reads. The run's data and train sections come from the config's `hope_run` (the
    defaults when the weights did not come from a run); optimizer state is not carried, so the run is
    for evaluation and as weights to start from, not for --resume."""
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    if not isinstance(hf, HOPEForCausalLM):
        raise ValueError(f"{hf_dir} holds a {type(hf).__name__}, not a HOPEForCausalLM")
    run = hf.config.hope_run or {}
    out = _empty_dir(Path(run_dir), "the run directory")
    cfg = RunConfig.from_dict({"model": hf.config.to_hope_config().to_dict(), "data": run.get("data") or {},
                               "train": {**(run.get("train") or {}), "out_dir": str(out)}})
    cfg.to_yaml(str(out / "config.yaml"))
    return save_checkpoint(out / CHECKPOINT_NAME, {"config": cfg.to_dict(), "model": from_hf(hf).state_dict(),
                                                   "step": int(run.get("step", 0)), "meta": run.get("meta") or {}})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="hope-hf", description="HOPE and Hugging Face transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="a hope-train run directory -> a Hugging Face folder (or back with --to-run)")
    c.add_argument("src", help="run directory or ckpt.pt (with --to-run: a Hugging Face folder)")
    c.add_argument("dst", help="new Hugging Face folder (with --to-run: new run directory)")
    c.add_argument("--to-run", action="store_true", help="convert a Hugging Face folder back to a run directory")
    a = p.parse_args(argv)
    try:
        if a.to_run:
            print(f"wrote {hf_to_run(a.src, a.dst)}")
        else:
            run_to_hf(a.src, a.dst)
            print(f"wrote {a.dst}")
    except (ValueError, FileNotFoundError, OSError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
