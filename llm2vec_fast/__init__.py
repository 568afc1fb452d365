"""llm2vec_fast: decoder-only LLMs as fast, faithful text encoders (LLM2Vec-style)."""
from .bidirectional import SUPPORTED_MODEL_TYPES, to_bidirectional, to_packed_causal
from .encoder import LLM2Vec
from .fused import fuse_ops, unfuse_ops
from .models import DEFAULT_MODEL, resolve_model

__version__ = "0.1.0"
__all__ = ["LLM2Vec", "to_bidirectional", "to_packed_causal", "fuse_ops", "unfuse_ops", "SUPPORTED_MODEL_TYPES",
           "resolve_model", "DEFAULT_MODEL"]
