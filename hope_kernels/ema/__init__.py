from .ops import ema_update_

__all__ = ["ema_update_"]
