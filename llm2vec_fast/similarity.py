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
    if not (t.is_floating_point() or t.dtype == torch.bool):
        # int8 / uint8 rows are quantized (each with its own offset) or packed binary bits: cosine, dot and distances
        # of their byte values mean nothing (sentence-transformers refuses them too)
        raise TypeError(f"{name} has integer dtype {t.dtype}: quantized or packed binary embeddings cannot be scored "
                        "here; score float embeddings, then quantize (or compare packed bits by Hamming distance)")
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


def semantic_search(query_embeddings, corpus_embeddings, top_k: int = 10, score_function="cosine",
                    query_chunk_size: int = 100, corpus_chunk_size: int = 500_000, exclude=None) -> list[list[dict]]:
    """The ``top_k`` corpus rows most similar to each query, as sentence-transformers' ``util.semantic_search``.

    Args:
        query_embeddings: ``[Q, D]`` (or ``[D]``) tensor, array or list; corpus_embeddings: ``[N, D]``. Scores are
            computed where the tensors are (pass CUDA tensors to search on the GPU), in float32.
        top_k: hits per query (fewer when the corpus, after ``exclude``, has fewer rows).
        score_function: a name of :data:`SIMILARITY_FUNCTIONS` or a callable ``(a [q, D], b [n, D]) -> [q, n]``.
        query_chunk_size, corpus_chunk_size: the scores of at most this many queries × corpus rows exist at once;
            the running top ``top_k`` is merged across corpus chunks, so memory does not grow with the corpus.
        exclude: optional, one iterable of corpus ids per query that must not be returned for it (a query's own
            positives, say).

    Returns: for each query, a list of ``{"corpus_id": int, "score": float}``, best first. Equal scores come in
    any order.
    """
    q, c = _as_2d(query_embeddings, "query_embeddings"), _as_2d(corpus_embeddings, "corpus_embeddings")
    if callable(score_function):
        score = score_function
    else:
        _check(score_function, q, c)
        def score(a, b, fn=score_function):
            return similarity(a, b, fn)
    if q.shape[-1] != c.shape[-1]:
        raise ValueError(f"embeddings have different widths: {q.shape[-1]} and {c.shape[-1]}")
    for name, size in (("top_k", top_k), ("query_chunk_size", query_chunk_size),
                       ("corpus_chunk_size", corpus_chunk_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    for name, t in (("query_embeddings", q), ("corpus_embeddings", c)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).any(-1).nonzero()[0])
            raise ValueError(f"{name} row {bad} is not finite (NaN or inf)")
    if exclude is not None:
        exclude = [list(e) for e in exclude]
        if len(exclude) != q.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} entries for {q.shape[0]} queries; expected one per query")
    c = c.to(q.device)
    n = c.shape[0]
    k = min(top_k, n)
    out = []
    for q0 in range(0, q.shape[0], query_chunk_size):
        qs = q[q0:q0 + query_chunk_size]
        best_s = torch.full((qs.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.zeros((qs.shape[0], 0), dtype=torch.long, device=q.device)
        for c0 in range(0, n, corpus_chunk_size):
            s = score(qs, c[c0:c0 + corpus_chunk_size]).float()
            if exclude is not None:
                for r, ids in enumerate(exclude[q0:q0 + qs.shape[0]]):
                    local = [i - c0 for i in ids if c0 <= i < c0 + s.shape[1]]
                    if local:
                        s[r, local] = float("-inf")
            ts, ti = s.topk(min(k, s.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, ts], 1).topk(min(k, best_s.shape[1] + ts.shape[1]), dim=1)
            best_i = torch.cat([best_i, ti + c0], 1).gather(1, order)
        for srow, irow in zip(best_s.tolist(), best_i.tolist(), strict=True):
            out.append([{"corpus_id": i, "score": s} for s, i in zip(srow, irow, strict=True) if s != float("-inf")])
    return out
