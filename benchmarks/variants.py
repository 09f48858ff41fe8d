"""The model variants, one registry for every benchmark: each is a name and the HOPEConfig overrides that
build it (on whatever width, depth and heads the benchmark sets), plus the quality tasks it runs on.

The model benchmark (`python -m benchmarks.model --variants`), the quality suite
(`python -m benchmarks.quality --variants`) and the ablation's reference cells build their models from
this table, and every table and result record names a model by its `name`. On a command line a variant
is its name or its `key` (the name in lower case, non-alphanumerics as '-': "seed HOPE" is
`seed-hope`); names hold no commas, since `--variants` is a comma list.

"Titans" uses the default gradient period (16: chunk-wise); "period 1" is the exact online delta gradient
descent (the delta rule with decay, as DeltaNet / Gated DeltaNet). A variant whose keys or values this
HOPEConfig does not accept is skipped with a note, not an error.
"""
from __future__ import annotations

import re
from typing import List, NamedTuple, Optional, Sequence

from hope import HOPEConfig

BOTH, LM_ONLY, NO_TASKS = ("mqar", "lm"), ("lm",), ()


class Variant(NamedTuple):
    name: str
    overrides: dict
    tasks: tuple = BOTH       # the quality suite's tasks (none: measured for speed only)

    @property
    def key(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


SEED = {"attention": "softmax", "cms": "multiscale"}
PAPER = {"attention": "titans", "self_modifying": True, "cms": "levels"}
VARIANTS: List[Variant] = [
    Variant("Transformer", {"attention": "softmax", "cms": "none"}),                      # attention -> MLP
    Variant("linear attention", {"attention": "linear", "cms": "none"}),
    Variant("seed HOPE", SEED),                                         # attention -> multi-timescale CMS -> MLP
    Variant("Titans", {"attention": "titans", "cms": "none"}),
    Variant("Titans period 1 (DGD)", {"attention": "titans", "titans_period": 1, "cms": "none"}),
    Variant("self-modifying Titans", {"attention": "titans", "self_modifying": True, "cms": "none"}),
    Variant("paper HOPE", PAPER),                                       # self-modifying Titans -> CMS levels
    Variant("Hope-attention", {"attention": "softmax", "cms": "levels"}),  # attention -> levels
    # the Transformer with the MLP widened to the seed HOPE's parameter count (equal-parameter LM row)
    Variant("Transformer with seed HOPE params (wider MLP)",
            {"attention": "softmax", "cms": "none", "mlp_ratio": 6.65625}, LM_ONLY),
    Variant("Titans HOPE", {"attention": "titans", "cms": "multiscale"}, NO_TASKS),  # Titans -> multi-timescale CMS -> MLP
    Variant("paper HOPE with MLP levels", {**PAPER, "cms_memory": "mlp"}, NO_TASKS),  # 2-layer MLP fast weights
    # the paper's HOPE in the form that recalls (docs/findings.md): M_k, M_v start as two random orthogonal
    # matrices (the memory writes from the first step) and M_mem has its own period 1 (full-strength writes)
    Variant("paper HOPE with online M_mem", {**PAPER, "titans_selfmod_init": "orthogonal", "titans_mem_period": 1}),
]


def variant(name: str) -> Variant:
    """The variant called `name` (its name or its key)."""
    for v in VARIANTS:
        if name in (v.name, v.key):
            return v
    raise ValueError(f"unknown variant {name!r}; known: {[v.key for v in VARIANTS]}")


def unsupported(overrides: dict) -> Optional[str]:
    """Why HOPEConfig rejects these overrides (None when it accepts them)."""
    try:
        HOPEConfig.from_dict(overrides)
    except (ValueError, TypeError) as e:
        return str(e).split(";")[0]
    return None


def available(names: Optional[Sequence[str]] = None, verbose: bool = True,
              tasks: Optional[Sequence[str]] = None) -> List[Variant]:
    """The variants (all, or those named, in the table's order) that this HOPEConfig accepts, and with
    `tasks` only those that run one of them; prints a note per skipped one."""
    if names is None:
        chosen = VARIANTS
    else:
        wanted = {variant(n).name for n in names}
        chosen = [v for v in VARIANTS if v.name in wanted]
    if tasks is not None:
        chosen = [v for v in chosen if set(v.tasks) & set(tasks)]
    out = []
    for v in chosen:
        why = unsupported(v.overrides)
        if why is None:
            out.append(v)
        elif verbose:
            print(f"note: skipping variant {v.name!r}: this HOPEConfig does not accept {v.overrides} ({why})")
    return out
