"""Readable token-by-token references of every op, the ground truth the kernels are tested against.

Each op folder keeps its own `reference.py` beside its kernels; this module gathers them. Same
signatures as the public ops minus `backend` / `chunk_size`; any floating dtype works (float64 gives a
float64 reference); states are float32 (float64 for float64 inputs).
"""
from .cms.reference import cms_scan, cms_step
from .ema.reference import ema_update_
from .linear_attention.reference import linear_attention, linear_attention_step
from .titans.reference import titans_scan, titans_selfmod_scan, titans_selfmod_step, titans_step

__all__ = ["linear_attention", "linear_attention_step", "cms_scan", "cms_step", "ema_update_",
           "titans_scan", "titans_step", "titans_selfmod_scan", "titans_selfmod_step"]
