"""Training losses: MNTP (shifted, masked rows only, fused linear cross-entropy), SimCSE InfoNCE and the supervised
hard-negative NLL, each with a plain PyTorch twin (``*_ref``) that the tests hold them to.

Contrastive losses gather the candidate embeddings of every process (with gradient) when torch.distributed is
initialised; each process scores its own queries against all candidates. The loss is then the mean over local queries
and, since the gather's backward sums gradients over processes and DDP averages them, the parameter gradient equals
that of the global mean over all queries.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# linear cross-entropy backend (Triton on CUDA, the PyTorch twin on CPU)
# ----------------------------------------------------------------------------------------------------------------


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` over non-ignored rows (0 when none).

    On CUDA the Triton ``fused_linear_cross_entropy`` (never materializes full logits for all rows); elsewhere, or
    with ``LLM2VEC_FAST_DISABLE_TRITON=1``, its PyTorch twin.
    """
    if hidden.dtype != weight.dtype:
        # e.g. fp32 hidden states from an fp32 LoRA path against a bf16 head: the op wants one dtype
        hidden = hidden.to(weight.dtype)
    if hidden.is_cuda and os.environ.get("LLM2VEC_FAST_DISABLE_TRITON") != "1":
        from llm2vec_fast.kernels import fused_linear_cross_entropy

        return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index)
    from llm2vec_fast.kernels.reference import fused_linear_cross_entropy_ref

    return fused_linear_cross_entropy_ref(hidden, weight, labels, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# MNTP
# ----------------------------------------------------------------------------------------------------------------


def shift_masked_rows(hidden: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                      ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``hidden`` that predict a masked token, and those tokens.

    The token at position i is predicted from the output at i − 1 (the causal-LM shift LLM2Vec's MNTP keeps), so a
    label at the first position of a sequence has no predictor and is dropped.

    ``hidden`` [B, L, H] with ``labels`` [B, L], or packed ``hidden`` [T, H] with ``labels`` [T] and ``cu_seqlens``
    int32 [B+1] (then no row predicts across a sequence boundary). Returns ``(rows [N, H], targets [N])``.
    """
    if hidden.dim() == 3:
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's [B, L] {tuple(hidden.shape[:2])}")
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
    elif hidden.dim() == 2:
        if labels.shape != hidden.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must be [T] = [{hidden.shape[0]}]")
        y = labels.clone()
        if cu_seqlens is not None:
            # a sequence's first token must not be predicted from the previous sequence's last token
            y[cu_seqlens[:-1].long().clamp(max=y.numel() - 1)] = ignore_index
        h, y = hidden[:-1], y[1:]
    else:
        raise ValueError(f"hidden must be [B, L, H] or packed [T, H], got shape {tuple(hidden.shape)}")
    idx = (y != ignore_index).nonzero().squeeze(1)
    return h.index_select(0, idx), y.index_select(0, idx)


def mntp_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
              ignore_index: int = -100) -> torch.Tensor:
    """MNTP loss: gather the rows that predict a masked token, then fused linear cross-entropy with the LM head."""
    rows, targets = shift_masked_rows(hidden, labels, cu_seqlens, ignore_index)
    return linear_cross_entropy(rows, weight, targets, ignore_index)


def mntp_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = -100) -> torch.Tensor:
    """Twin of :func:`mntp_loss` for [B, L, H]: the original path, full-vocabulary logits for every position."""
    logits = hidden.float() @ weight.float().T
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# distributed gather with gradient
# ----------------------------------------------------------------------------------------------------------------


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` [n, H] over processes with gradient (this rank's slice first in rank order); returns the
    gathered tensor and the row offset of this rank's slice. Identity when torch.distributed is not initialised.
    Every rank must pass the same ``n`` (the trainers drop the last incomplete batch)."""
    if not _dist_ready():
        return x, 0
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        # torch 2.13 deprecates it for a private functional collective whose name changed across versions; this
        # autograd all-gather is public on every torch we run on (2.11 to 2.13)
        warnings.filterwarnings("ignore", message=".*all_gather.*", category=FutureWarning)
        parts = dist_fn.all_gather(x.contiguous())
    return torch.cat(parts, dim=0), torch.distributed.get_rank() * x.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# contrastive losses
# ----------------------------------------------------------------------------------------------------------------


def _acc(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 embeddings are scored in fp32; fp64 stays fp64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(_acc(a), dim=-1) @ F.normalize(_acc(b), dim=-1).T


def hard_negative_nll_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, scale: float = 50.0,
                           mask_false_negatives: bool = False, gather: bool = True,
                           matryoshka_dims: Sequence[int] | None = None,
                           matryoshka_weights: Sequence[float] | None = None, symmetric: bool = False) -> torch.Tensor:
    """InfoNCE with in-batch and hard negatives (LLM2Vec's ``HardNegativeNLLLoss``).

    Query i is scored (cosine × ``scale``) against every positive and every hard negative of the (global) batch;
    cross-entropy towards its own positive, mean over queries.

    ``q`` [B, H], ``p`` [B, H], ``n`` [B, H] or None. ``mask_false_negatives``: a positive of another query that scores
    above query i's own positive is taken for a false negative and left out of query i's softmax. Under
    torch.distributed (and ``gather``) positives and negatives of all processes are candidates.

    ``matryoshka_dims`` (sentence-transformers' ``MatryoshkaLoss``): the loss is computed on the first d dimensions
    of every embedding for each d (cosine renormalizes each prefix), and the results are summed with
    ``matryoshka_weights`` (default 1 each), so that truncated embeddings (``encode(..., truncate_dim=d)``) keep
    their quality. The embeddings are gathered across processes once for all d.

    ``symmetric`` (sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``): the mean of the loss above
    and of the reverse direction, where positive i is scored against every query of the (global) batch, cross-entropy
    towards its own query (hard negatives and ``mask_false_negatives`` take part in the query → positive direction
    only).
    """
    if q.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"q and p must both be [B, H] of the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    if n is not None and n.shape[1:] != q.shape[1:]:
        raise ValueError(f"hard negatives must be [*, {q.shape[1]}], got {tuple(n.shape)}")
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, q.shape[1])
    if gather:
        p_all, off = gather_with_grad(p)
        n_all = gather_with_grad(n)[0] if n is not None else None
        q_all = gather_with_grad(q)[0] if symmetric else None
    else:
        p_all, off = p, 0
        n_all = n
        q_all = q
    cand = p_all if n_all is None else torch.cat([p_all, n_all], dim=0)
    target = torch.arange(q.shape[0], device=q.device) + off
    losses = []
    for d, w in zip(dims, weights, strict=True):
        scores = _cos(q[:, :d], cand[:, :d]) * scale  # [B, Bp (+ Bn)]
        if mask_false_negatives:
            n_pos = p_all.shape[0]
            own = scores.gather(1, target[:, None])  # [B, 1]
            col = torch.arange(scores.shape[1], device=q.device)[None, :]
            false_neg = (col < n_pos) & (col != target[:, None]) & (scores > own)
            scores = scores.masked_fill(false_neg, float("-inf"))
        loss = F.cross_entropy(scores, target)
        if symmetric:
            loss = (loss + F.cross_entropy(_cos(p[:, :d], q_all[:, :d]) * scale, target)) / 2
        losses.append(loss if w == 1.0 else loss * w)
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


def check_matryoshka(dims: Sequence[int] | None, weights: Sequence[float] | None = None,
                     width: int | None = None) -> tuple[list[int], list[float]]:
    """``(dims, weights)`` of a Matryoshka loss: ``[width]`` and ``[1.0]`` for None; else checked positive ints
    (at most ``width``, no repeats) with one finite non-negative weight each."""
    if dims is None:
        if weights is not None:
            raise ValueError(f"matryoshka_weights {list(weights)} given without matryoshka_dims")
        return [width], [1.0]
    dims = list(dims)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
        raise ValueError(f"matryoshka_dims must be a non-empty list of ints >= 1, got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka_dims has repeats: {dims}")
    if width is not None and max(dims) > width:
        raise ValueError(f"matryoshka_dims {dims}: {max(dims)} is more than the embedding width {width}")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims) or any(not (w >= 0 and w < float("inf")) for w in weights) or not any(weights):
        raise ValueError(f"matryoshka_weights must be one finite weight >= 0 per dimension (not all 0), got "
                         f"{weights} for dims {dims}")
    return dims, weights


def simcse_loss(a: torch.Tensor, b: torch.Tensor, scale: float = 20.0, gather: bool = True) -> torch.Tensor:
    """Unsupervised SimCSE InfoNCE: ``a[i]`` and ``b[i]`` are two dropout views of sentence i, every other ``b[j]``
    is an in-batch negative; cosine × ``scale`` (20 = temperature 0.05), cross-entropy, mean over ``a``."""
    return hard_negative_nll_loss(a, b, None, scale=scale, gather=gather)


def hard_negative_nll_loss_ref(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, scale: float = 50.0,
                               mask_false_negatives: bool = False, matryoshka_dims: Sequence[int] | None = None,
                               matryoshka_weights: Sequence[float] | None = None,
                               symmetric: bool = False) -> torch.Tensor:
    """Twin of :func:`hard_negative_nll_loss` (single process): one query at a time, written out; a Matryoshka loss
    is the weighted sum of this over the truncated embeddings; the symmetric loss the mean of this and of the same
    with the positives as queries and the queries as their only candidates."""
    if matryoshka_dims is not None:
        weights = matryoshka_weights or [1.0] * len(matryoshka_dims)
        return sum(w * hard_negative_nll_loss_ref(q[:, :d], p[:, :d], None if n is None else n[:, :d], scale,
                                                  mask_false_negatives, symmetric=symmetric)
                   for d, w in zip(matryoshka_dims, weights, strict=True))
    if symmetric:
        return (hard_negative_nll_loss_ref(q, p, n, scale, mask_false_negatives)
                + hard_negative_nll_loss_ref(p, q, None, scale)) / 2
    cands = list(p) + (list(n) if n is not None else [])
    losses = []
    for i in range(q.shape[0]):
        qi = _acc(q[i])
        s = torch.stack([torch.dot(qi, _acc(c)) / (qi.norm() * _acc(c).norm()).clamp_min(1e-12) for c in cands])
        s = s * scale
        keep = torch.ones(len(cands), dtype=torch.bool)
        if mask_false_negatives:
            for j in range(p.shape[0]):
                if j != i and s[j] > s[i]:
                    keep[j] = False
        losses.append(torch.logsumexp(s[keep], dim=0) - s[i])
    return torch.stack(losses).mean()


GIST_MARGIN_STRATEGIES = ("absolute", "relative")


def gist_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, gq: torch.Tensor, gp: torch.Tensor,
              gn: torch.Tensor | None = None, scale: float = 100.0, margin: float = 0.0,
              margin_strategy: str = "absolute", contrast_anchors: bool = True, contrast_positives: bool = True,
              gather: bool = True, matryoshka_dims: Sequence[int] | None = None,
              matryoshka_weights: Sequence[float] | None = None) -> torch.Tensor:
    """GISTEmbed (Solatorio, 2024; sentence-transformers' ``GISTEmbedLoss``): InfoNCE whose negatives are filtered by
    a frozen guide model.

    ``q``, ``p`` [B, H] and hard negatives ``n`` [Bn, H] (or None) are the trained model's embeddings; ``gq``, ``gp``,
    ``gn`` the guide's for the same texts (any width). Query i's candidates are every positive and hard negative of
    the (global) batch, and, with ``contrast_anchors`` / ``contrast_positives``, the batch's other queries and
    positive i's similarity to the other positives (as sentence-transformers builds them). A candidate whose guide
    similarity to query i (for the positive-positive block: to positive i) exceeds the guide's similarity of query i
    and its own positive, less ``margin`` (``absolute``) or less ``|that| × margin`` (``relative``), is taken for a
    false negative and left out; the own positive never is. Cosine × ``scale`` (100 = temperature 0.01),
    cross-entropy towards the own positive, mean over queries. Under torch.distributed (and ``gather``) positives and
    negatives, the guide's too, of all processes are candidates; queries stay local, as in sentence-transformers.
    ``matryoshka_dims``: the loss on each prefix of the trained embeddings (the guide's filter is the same for all),
    weighted and summed."""
    if q.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"q and p must both be [B, H] of the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")
    if gq.shape[0] != q.shape[0] or gp.shape[0] != p.shape[0] or (n is None) != (gn is None) \
            or (n is not None and gn.shape[0] != n.shape[0]):
        raise ValueError(f"the guide's embeddings must match the model's row for row: q {tuple(q.shape)} / "
                         f"{tuple(gq.shape)}, p {tuple(p.shape)} / {tuple(gp.shape)}, n "
                         f"{None if n is None else tuple(n.shape)} / {None if gn is None else tuple(gn.shape)}")
    if margin_strategy not in GIST_MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {GIST_MARGIN_STRATEGIES}, got {margin_strategy!r}")
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, q.shape[1])
    b = q.shape[0]
    if gather:
        p_all, off = gather_with_grad(p)
        gp_all = gather_with_grad(gp)[0]
        n_all = gather_with_grad(n)[0] if n is not None else None
        gn_all = gather_with_grad(gn)[0] if gn is not None else None
    else:
        p_all, off, gp_all, n_all, gn_all = p, 0, gp, n, gn
    with torch.no_grad():
        g_ap = _cos(gq, gp_all)
        rows = torch.arange(b, device=q.device)
        own = g_ap[rows, off + rows][:, None]  # the guide's query i · positive i
        limit = own - margin if margin_strategy == "absolute" else own - own.abs() * margin
        blocks = [g_ap > limit]
        blocks[0][rows, off + rows] = False  # the own positive is never filtered
        if contrast_anchors:
            blocks.append(_cos(gq, gq) > limit)
        if contrast_positives:
            blocks.append(_cos(gp_all[off:off + b], gp_all) > limit)
        if n_all is not None:
            blocks.append(_cos(gq, gn_all) > limit)
        masked = torch.cat(blocks, dim=1)
    target = rows + off
    losses = []
    for d, w in zip(dims, weights, strict=True):
        sims = [_cos(q[:, :d], p_all[:, :d])]
        if contrast_anchors:
            sims.append(_cos(q[:, :d], q[:, :d]))
        if contrast_positives:
            sims.append(_cos(p_all[off:off + b, :d], p_all[:, :d]))
        if n_all is not None:
            sims.append(_cos(q[:, :d], n_all[:, :d]))
        scores = (torch.cat(sims, dim=1) * scale).masked_fill(masked, float("-inf"))
        loss = F.cross_entropy(scores, target)
        losses.append(loss if w == 1.0 else loss * w)
    return losses[0] if len(losses) == 1 else torch.stack(losses).sum()


def gist_loss_ref(q, p, n, gq, gp, gn=None, scale=100.0, margin=0.0, margin_strategy="absolute",
                  contrast_anchors=True, contrast_positives=True) -> torch.Tensor:
    """Twin of :func:`gist_loss` (single process, no Matryoshka): one query at a time, candidates listed and
    filtered one by one."""
    def cos(a, b):
        a, b = _acc(a), _acc(b)
        return torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)

    losses = []
    for i in range(q.shape[0]):
        g_own = cos(gq[i], gp[i])
        limit = g_own - margin if margin_strategy == "absolute" else g_own - g_own.abs() * margin
        cands = [(cos(q[i], p[j]), cos(gq[i], gp[j]), j == i) for j in range(p.shape[0])]
        if contrast_anchors:
            cands += [(cos(q[i], q[j]), cos(gq[i], gq[j]), False) for j in range(q.shape[0])]
        if contrast_positives:
            cands += [(cos(p[i], p[j]), cos(gp[i], gp[j]), False) for j in range(p.shape[0])]
        if n is not None:
            cands += [(cos(q[i], n[j]), cos(gq[i], gn[j]), False) for j in range(n.shape[0])]
        kept = [s * scale for s, g, is_own in cands if is_own or not bool(g > limit)]
        losses.append(torch.logsumexp(torch.stack(kept), dim=0) - cos(q[i], p[i]) * scale)
    return torch.stack(losses).mean()


def simcse_loss_ref(a: torch.Tensor, b: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Twin of :func:`simcse_loss`."""
    return hard_negative_nll_loss_ref(a, b, None, scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# scored pairs (STS-style data: two texts and a similarity score)
# ----------------------------------------------------------------------------------------------------------------

PAIR_LOSSES = ("cosent", "angle", "cosine")


def pair_similarity(a: torch.Tensor, b: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Row-wise similarity of ``a`` [B, H] and ``b`` [B, H] (at least fp32), [B].

    ``cosine``; or ``angle``, AnglE's (arXiv 2309.12871) similarity as sentence-transformers computes it: each
    embedding is L2-normalised and read as a complex vector whose real part is its first half and imaginary part its
    second half (an odd width is padded with one zero); with ``z = Σ a · conj(b)`` the score is ``|Re z + Im z|``
    (``Re z`` is the cosine), the value of sentence-transformers' ``pairwise_angle_sim``.
    """
    a, b = _acc(a), _acc(b)
    if kind == "cosine":
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
    if kind != "angle":
        raise ValueError(f"similarity must be 'cosine' or 'angle', got {kind!r}")
    if a.shape[-1] % 2:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    h = a.shape[-1] // 2
    re_a, im_a, re_b, im_b = a[:, :h], a[:, h:], b[:, :h], b[:, h:]
    cos = (re_a * re_b + im_a * im_b).sum(-1)
    sin = (im_a * re_b - re_a * im_b).sum(-1)
    return (cos + sin).abs()


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, scale: float = 20.0,
                similarity: str = "cosine") -> torch.Tensor:
    """CoSENT (Su, 2022; sentence-transformers' ``CoSENTLoss``; with ``similarity="angle"`` its ``AnglELoss``).

    With ``s_i = scale × sim(a_i, b_i)`` and gold ``scores`` y: ``log(1 + Σ_{(i, j): y_i > y_j} exp(s_j − s_i))``,
    over every ordered pair of pairs in the batch: a pair scored higher by the gold must come out more similar. Only
    the order of the gold scores matters. One number per batch (a log-sum, not a mean over pairs).

    In O(B log B) time and O(B) memory: with the pairs sorted by gold score, ``Σ_{j: y_j < y_i} exp(s_j)`` is a
    running log-sum-exp up to the first pair of y_i's tie group, so no B × B matrix is formed.
    """
    s = pair_similarity(a, b, similarity) * scale
    y = scores.to(s.device, s.dtype).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"one score per pair expected: {s.shape[0]} pairs, scores of shape {tuple(scores.shape)}")
    order = torch.argsort(y)
    y_sorted, s_sorted = y[order].contiguous(), s[order]
    running = torch.logcumsumexp(s_sorted, dim=0)  # [k] = log Σ_{m <= k} exp(s_sorted[m])
    lower = torch.searchsorted(y_sorted, y_sorted)  # how many pairs have a strictly lower gold score
    below = torch.where(lower > 0, running[(lower - 1).clamp(min=0)], torch.full_like(s_sorted, float("-inf")))
    return torch.logsumexp(torch.cat([s.new_zeros(1), below - s_sorted]), dim=0)


def cosine_mse_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' ``CosineSimilarityLoss``: mean of ``(cos(a_i, b_i) − y_i)²``; the scores should lie
    where cosines can reach them (the trainer rescales gold scores to [0, 1])."""
    c = pair_similarity(a, b, "cosine")
    y = scores.to(c.device, c.dtype).reshape(-1)
    if y.shape != c.shape:
        raise ValueError(f"one score per pair expected: {c.shape[0]} pairs, scores of shape {tuple(scores.shape)}")
    return F.mse_loss(c, y)


def scored_pair_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, loss: str = "cosent",
                     scale: float = 20.0, matryoshka_dims: Sequence[int] | None = None,
                     matryoshka_weights: Sequence[float] | None = None) -> torch.Tensor:
    """The loss of a batch of scored pairs: ``cosent``, ``angle`` (CoSENT on AnglE's similarity) or ``cosine``
    (MSE of the cosine against the score; ``scale`` unused). With ``matryoshka_dims`` the weighted sum of the loss
    on each embedding prefix.

    Pairs are compared within the local batch: under torch.distributed each process scores its own pairs and DDP
    averages the gradients, as sentence-transformers does (CoSENT compares pairs, not candidates, so there is nothing
    to gather).
    """
    if loss not in PAIR_LOSSES:
        raise ValueError(f"loss must be one of {PAIR_LOSSES}, got {loss!r}")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [B, H] of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, a.shape[1])
    total = None
    for d, w in zip(dims, weights, strict=True):
        if loss == "cosine":
            value = cosine_mse_loss(a[:, :d], b[:, :d], scores)
        else:
            value = cosent_loss(a[:, :d], b[:, :d], scores, scale, "angle" if loss == "angle" else "cosine")
        value = value if w == 1.0 else value * w
        total = value if total is None else total + value
    return total


def scored_pair_loss_ref(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor, loss: str = "cosent",
                         scale: float = 20.0, matryoshka_dims: Sequence[int] | None = None,
                         matryoshka_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Twin of :func:`scored_pair_loss`: one pair, and one pair of pairs, at a time, written out."""
    if matryoshka_dims is not None:
        weights = matryoshka_weights or [1.0] * len(matryoshka_dims)
        return sum(w * scored_pair_loss_ref(a[:, :d], b[:, :d], scores, loss, scale)
                   for d, w in zip(matryoshka_dims, weights, strict=True))

    def cos(x, y):
        return torch.dot(x, y) / (x.norm() * y.norm()).clamp_min(1e-12)

    def angle(x, y):
        if x.numel() % 2:
            x, y = torch.cat([x, x.new_zeros(1)]), torch.cat([y, y.new_zeros(1)])
        x, y = x / x.norm().clamp_min(1e-12), y / y.norm().clamp_min(1e-12)
        h = x.numel() // 2
        zx, zy = torch.complex(x[:h], x[h:]), torch.complex(y[:h], y[h:])
        prod = (zx * zy.conj()).sum()  # real part: the cosine; imaginary part: the sine term
        return (prod.real + prod.imag).abs()

    sims = []
    for i in range(a.shape[0]):
        x, y = _acc(a[i]), _acc(b[i])
        sims.append(angle(x, y) if loss == "angle" else cos(x, y))
    gold = [float(v) for v in scores.reshape(-1)]
    if loss == "cosine":
        return torch.stack([(s - g) ** 2 for s, g in zip(sims, gold, strict=True)]).mean()
    terms = [sims[0].new_zeros(())]
    for i in range(len(sims)):
        for j in range(len(sims)):
            if gold[i] > gold[j]:
                terms.append(scale * (sims[j] - sims[i]))
    return torch.logsumexp(torch.stack(terms), dim=0)
