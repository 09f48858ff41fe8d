from .ops import linear_attention, linear_attention_step

__all__ = ["linear_attention", "linear_attention_step"]
