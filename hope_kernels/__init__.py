"""hope-kernels: Triton kernels for linear attention and the fused multi-timescale CMS memory.

Every op takes `backend=None | "triton" | "torch"` (keyword-only); see DESIGN.md.
"""
from . import reference
from .utils import resolve_backend
from .linear_attention import linear_attention, linear_attention_step
from .cms import cms_scan, cms_step
from .ema import ema_update_
from .titans import titans_scan, titans_step, titans_selfmod_scan, titans_selfmod_step

__all__ = [
    "linear_attention", "linear_attention_step", "cms_scan", "cms_step", "ema_update_",
    "titans_scan", "titans_step", "titans_selfmod_scan", "titans_selfmod_step", "reference", "resolve_backend",
]
__version__ = "0.1.0"
