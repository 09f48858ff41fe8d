from .ops import cms_scan, cms_step

__all__ = ["cms_scan", "cms_step"]
