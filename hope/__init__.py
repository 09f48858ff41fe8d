"""hope: the HOPE model stack (Nested Learning) on the hope_kernels ops.

The default block reads top to bottom in hope/model.py -> hope/block.py -> hope/cms.py (the layers it
builds: hope/attention.py, hope/titans.py, hope/selfmod.py, hope/levels.py; the shared pieces in
hope/layers.py); hope/config.py holds its fields. The model and its layers take `backend=`
(None | "triton" | "torch" | "reference") so the same weights run on the Triton kernels, the chunked
PyTorch path or the token-by-token references.
"""
from . import optim
from .attention import LinearAttention, SoftmaxAttention
from .block import HOPEBlock
from .cms import CMSLayer, default_taus
from .config import HOPEConfig
from .data import ByteTokenizer, TokenStream, read_corpus
from .generation import HOPECache
from .layers import MLP, Embeddings, RMSNorm, RotaryEmbedding
from .levels import LinearLevel, MLPLevel
from .memory import AssociativeMemory
from .model import HOPE
from .optim import DeepMomentum
from .selfmod import SelfModifyingTitans
from .titans import TitansLayer
from .ops import get_op

__all__ = [
    "HOPE", "HOPEConfig", "HOPEBlock", "HOPECache", "SoftmaxAttention", "LinearAttention", "CMSLayer",
    "TitansLayer", "SelfModifyingTitans", "LinearLevel", "MLPLevel",
    "MLP", "RMSNorm", "RotaryEmbedding", "Embeddings", "AssociativeMemory", "default_taus", "get_op",
    "DeepMomentum", "ByteTokenizer", "TokenStream", "read_corpus", "optim",
]
