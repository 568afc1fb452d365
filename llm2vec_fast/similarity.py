"""Similarity of embeddings, as sentence-transformers' ``SentenceTransformer.similarity`` computes it.

``cosine`` and ``dot`` are similarities; ``euclidean`` and ``manhattan`` are *negative* distances, so that larger is
more similar for every function (sentence-transformers' convention). Inputs: torch tensors, numpy arrays or lists,
``[N, D]`` or ``[D]``; outputs are float32 torch tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def _as_2d(x, name) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple)):
        t = torch.as_tensor(np.asarray(x))
    else:
        raise TypeError(f"{name} must be a tensor, array or list of embeddings, got {type(x).__name__}")
    t = t.float()
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2:
        raise ValueError(f"{name} must be [N, D] or [D], got shape {tuple(t.shape)}")
    return t


def _check(fn, a, b):
    if fn not in SIMILARITY_FUNCTIONS:
        raise ValueError(f"unknown similarity function {fn!r}; expected one of {SIMILARITY_FUNCTIONS}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embeddings have different widths: {a.shape[-1]} and {b.shape[-1]}")


def similarity(embeddings1, embeddings2, fn: str = "cosine") -> torch.Tensor:
    """All pairs: ``[N1, N2]``."""
    a, b = _as_2d(embeddings1, "embeddings1"), _as_2d(embeddings2, "embeddings2")
    _check(fn, a, b)
    if fn == "cosine":
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    if fn == "dot":
        return a @ b.T
    return -torch.cdist(a, b, p=2.0 if fn == "euclidean" else 1.0)


def similarity_pairwise(embeddings1, embeddings2, fn: str = "cosine") -> torch.Tensor:
    """Row i with row i: ``[N]``."""
    a, b = _as_2d(embeddings1, "embeddings1"), _as_2d(embeddings2, "embeddings2")
    _check(fn, a, b)
    if a.shape != b.shape:
        raise ValueError(f"pairwise similarity needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if fn == "cosine":
        return F.cosine_similarity(a, b, dim=-1)
    if fn == "dot":
        return (a * b).sum(-1)
    return -(a - b).norm(p=2 if fn == "euclidean" else 1, dim=-1)
