from .ops import titans_scan, titans_step

__all__ = ["titans_scan", "titans_step"]
