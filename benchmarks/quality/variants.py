"""The model variants: each is a row of HOPEConfig overrides on a shared base (width, depth, heads).

Adding a variant is one line; names hold no commas (`--variants` is a comma list). A variant whose
keys or values this HOPEConfig does not accept is skipped with a note, not an error. "Titans" uses the default gradient period (16: chunk-wise); "period 1" is the
exact online delta gradient descent (the delta rule with decay, as DeltaNet / Gated DeltaNet).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from hope import HOPEConfig

BOTH, LM_ONLY = ("mqar", "lm"), ("lm",)
# (name, HOPEConfig overrides, tasks)
VARIANTS: List[Tuple[str, dict, tuple]] = [
    ("Transformer", {"attention": "softmax", "use_cms": False}, BOTH),
    ("linear attention", {"attention": "linear", "use_cms": False}, BOTH),
    ("seed HOPE", {"attention": "softmax", "use_cms": True}, BOTH),
    ("Titans", {"attention": "titans", "use_cms": False}, BOTH),
    ("Titans period 1 (DGD)", {"attention": "titans", "titans_period": 1, "use_cms": False}, BOTH),
    ("self-modifying Titans", {"attention": "titans", "self_modifying": True, "use_cms": False}, BOTH),
    ("paper HOPE", {"attention": "titans", "self_modifying": True, "use_cms": True, "cms": "levels"}, BOTH),
    ("Hope-attention", {"attention": "softmax", "use_cms": True, "cms": "levels"}, BOTH),
    # the Transformer with the MLP widened to the seed HOPE's parameter count (equal-parameter LM row)
    ("Transformer with seed HOPE params (wider MLP)", {"attention": "softmax", "use_cms": False,
                                                     "mlp_ratio": 6.65625}, LM_ONLY),
]


def unsupported(overrides: dict) -> Optional[str]:
    """Why HOPEConfig rejects these overrides (None when it accepts them)."""
    try:
        HOPEConfig.from_dict(overrides)
    except (ValueError, TypeError) as e:
        return str(e).split(";")[0]
    return None


def available(names: Optional[List[str]] = None, verbose: bool = True) -> List[Tuple[str, dict, tuple]]:
    """The variants (all, or those named) that this HOPEConfig accepts; prints a note per skipped one."""
    chosen = VARIANTS if names is None else [v for v in VARIANTS if v[0] in names]
    if names is not None and len(chosen) < len(names):
        unknown = sorted(set(names) - {v[0] for v in VARIANTS})
        raise ValueError(f"unknown variant(s) {unknown}; known: {[v[0] for v in VARIANTS]}")
    out = []
    for name, ov, tasks in chosen:
        why = unsupported(ov)
        if why is None:
            out.append((name, ov, tasks))
        elif verbose:
            print(f"note: skipping variant {name!r}: this HOPEConfig does not accept {ov} ({why})")
    return out
