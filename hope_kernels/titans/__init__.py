from .ops import titans_scan, titans_step
from .selfmod import titans_selfmod_scan, titans_selfmod_step

__all__ = ["titans_scan", "titans_step", "titans_selfmod_scan", "titans_selfmod_step"]
