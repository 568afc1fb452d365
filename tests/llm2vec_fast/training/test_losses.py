"""Training losses against their PyTorch twins (values and gradients), shift alignment, distributed gather."""
import os
import time

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.training.losses import (
    hard_negative_nll_loss,
    hard_negative_nll_loss_ref,
    mntp_loss,
    mntp_loss_ref,
    shift_masked_rows,
    simcse_loss,
    simcse_loss_ref,
)


def test_shift_alignment_padded():
    B, L, H = 2, 7, 3
    hidden = torch.arange(B * L, dtype=torch.float32)[:, None].repeat(1, H).view(B, L, H)  # row value = b*L + pos
    labels = torch.full((B, L), -100)
    labels[0, 3] = 11
    labels[1, 0] = 12  # first position: no predictor, dropped
    labels[1, 6] = 13
    rows, targets = shift_masked_rows(hidden, labels)
    assert targets.tolist() == [11, 13]
    assert rows[:, 0].tolist() == [2.0, 1 * L + 5.0]  # predicted from position i - 1 of the same sequence


def test_shift_alignment_packed_boundaries():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    hidden = torch.arange(8, dtype=torch.float32)[:, None]
    labels = torch.full((8,), -100)
    labels[3] = 5  # first token of sequence 1: must not be predicted from sequence 0's last token
    labels[4] = 6  # first token of sequence 2
    labels[2] = 7
    labels[7] = 8
    rows, targets = shift_masked_rows(hidden, labels, cu)
    assert targets.tolist() == [7, 8]
    assert rows[:, 0].tolist() == [1.0, 6.0]


@pytest.mark.parametrize("V", [97, 130])
def test_mntp_loss_matches_full_logits_twin(V):
    torch.manual_seed(0)
    B, L, H = 3, 11, 16
    hidden = torch.randn(B, L, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    labels[torch.rand(B, L) > 0.3] = -100
    labels[:, 1] = 3  # at least one target
    ours = mntp_loss(hidden, weight, labels)
    g = torch.autograd.grad(ours, (hidden, weight))
    ref = mntp_loss_ref(hidden, weight, labels)
    gr = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-6)
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def test_mntp_loss_without_targets_is_zero_with_zero_grads():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 4  # only first positions: nothing to predict after the shift
    loss = mntp_loss(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def _reps(n, h, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("with_neg", [False, True], ids=["in-batch", "hard-neg"])
@pytest.mark.parametrize("mask_fn", [False, True], ids=["plain", "mask-false-neg"])
def test_hard_negative_loss_matches_twin(with_neg, mask_fn):
    q, p = _reps(5, 8, 0), _reps(5, 8, 1)
    n = _reps(5, 8, 2) if with_neg else None
    args = [q, p] + ([n] if with_neg else [])
    ours = hard_negative_nll_loss(q, p, n, scale=50.0, mask_false_negatives=mask_fn)
    ref = hard_negative_nll_loss_ref(q, p, n, scale=50.0, mask_false_negatives=mask_fn)
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(ours, args), torch.autograd.grad(ref, args), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mask_fn", [False, True], ids=["plain", "mask-false-neg"])
def test_matryoshka_loss_matches_twin(mask_fn):
    """Prefix dims 2, 5 and the full 9 (odd widths), unequal weights, hard negatives: values and gradients; the
    gradient reaches the dimensions past the smallest prefix only through the larger ones."""
    q, p, n = _reps(5, 9, 10), _reps(5, 9, 11), _reps(5, 9, 12)
    kw = dict(scale=20.0, mask_false_negatives=mask_fn, matryoshka_dims=[9, 5, 2], matryoshka_weights=[1.0, 0.5, 2.0])
    ours = hard_negative_nll_loss(q, p, n, **kw)
    ref = hard_negative_nll_loss_ref(q, p, n, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    for a, b in zip(torch.autograd.grad(ours, (q, p, n)), torch.autograd.grad(ref, (q, p, n)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    by_hand = sum(w * hard_negative_nll_loss(q[:, :d], p[:, :d], n[:, :d], scale=20.0, mask_false_negatives=mask_fn)
                  for d, w in ((9, 1.0), (5, 0.5), (2, 2.0)))
    torch.testing.assert_close(ours, by_hand)
    only_two = hard_negative_nll_loss(q, p, n, scale=20.0, matryoshka_dims=[2])
    assert torch.autograd.grad(only_two, q)[0][:, 2:].abs().max() == 0
    # the full width alone is the plain loss, bit for bit
    assert torch.equal(hard_negative_nll_loss(q, p, n, matryoshka_dims=[9]), hard_negative_nll_loss(q, p, n))


@pytest.mark.parametrize("dims, weights, match", [
    ([], None, "non-empty"), ([0, 4], None, ">= 1"), ([4, 4], None, "repeats"), ([4, 12], None, "more than the "
                                                                                        "embedding width 9"),
    ([4, 2], [1.0], "one finite weight"), ([4, 2], [0.0, 0.0], "not all 0"), ([4], [float("nan")], "finite"),
    (None, [1.0], "without matryoshka_dims"), ([2.5], None, "ints")])
def test_matryoshka_arguments_are_checked(dims, weights, match):
    q = torch.randn(3, 9)
    with pytest.raises(ValueError, match=match):
        hard_negative_nll_loss(q, q, matryoshka_dims=dims, matryoshka_weights=weights)


def test_false_negative_mask_changes_the_loss_only_when_triggered():
    q, p = _reps(4, 6, 3), _reps(4, 6, 4)
    with torch.no_grad():
        p[1] = q[0] * 2  # query 0's best match is positive 1: a likely false negative for query 0
    plain = hard_negative_nll_loss(q, p, scale=20.0)
    masked = hard_negative_nll_loss(q, p, scale=20.0, mask_false_negatives=True)
    assert masked < plain
    # when every query's own positive scores highest, masking removes nothing
    q2 = _reps(4, 6, 5)
    p2 = q2.detach() + 0.01 * torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(hard_negative_nll_loss(q2, p2, mask_false_negatives=True),
                               hard_negative_nll_loss(q2, p2))


def test_simcse_loss_matches_twin_and_definition():
    a, b = _reps(6, 8, 6), _reps(6, 8, 7)
    ours = simcse_loss(a, b)
    torch.testing.assert_close(ours, simcse_loss_ref(a, b).to(ours.dtype))
    logits = F.cosine_similarity(a[:, None], b[None], dim=-1) * 20.0
    torch.testing.assert_close(ours, F.cross_entropy(logits, torch.arange(6)), rtol=1e-6, atol=1e-6)
    for x, y in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(simcse_loss_ref(a, b), (a, b)),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        hard_negative_nll_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="hard negatives"):
        hard_negative_nll_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 5))


def _dist_worker(rank, world, port, path, q, p, n, symmetric=False, guide=None):
    import torch.distributed as dist

    from llm2vec_fast.training.losses import gist_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = q.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        ql, pl, nl = (x[sl].clone().requires_grad_(True) for x in (q, p, n))
        if guide is not None:  # GISTEmbed; the other queries are local candidates only, so they are left out here
            loss = gist_loss(ql, pl, nl, *(g[sl] for g in guide), scale=50.0, contrast_anchors=False)
        else:
            loss = hard_negative_nll_loss(ql, pl, nl, scale=50.0, mask_false_negatives=True, symmetric=symmetric)
        loss.backward()
        torch.save((loss.detach(), [g.clone() for g in (ql.grad, pl.grad, nl.grad)]), f"{path}/{rank}.pt")
        # both ranks finished every collective before either tears gloo down: a rank that destroys its group while
        # the other's gloo threads still hold the connection makes that one abort (SIGABRT, seen once in CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("symmetric", [False, True, "gist"], ids=["one-way", "symmetric", "gist"])
def test_gather_across_processes_equals_global_batch(tmp_path, symmetric):
    """Two gloo processes, half the batch each: the mean of their losses equals the single-process loss on the
    whole batch, and their representation gradients, divided by the world size as DDP's averaging of parameter
    gradients does, equal the whole-batch gradients (symmetric: the queries are gathered too)."""
    import socket

    import torch.multiprocessing as mp

    q, p, n = (_reps(6, 8, s).detach() for s in (10, 11, 12))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a child forked after the parent's OpenMP pool started hangs in its first parallel region
    # (it did in the full suite); a deadline turns any other hang into a failure
    guide = None
    if symmetric == "gist":
        guide = tuple(x.detach()[:, :5] * 3 for x in (q, p, n))
        guide[1][1] = guide[1][0]  # a filtered candidate on the other rank's side
        guide[2][4] = guide[1][0]
    ctx = mp.start_processes(_dist_worker, args=(2, port, str(tmp_path), q, p, n, symmetric is True, guide), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the two gloo workers did not finish within 180 s")
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    qg, pg, ng = (x.clone().requires_grad_(True) for x in (q, p, n))
    if guide is not None:
        from llm2vec_fast.training.losses import gist_loss

        full = gist_loss(qg, pg, ng, *guide, scale=50.0, contrast_anchors=False, gather=False)
    else:
        full = hard_negative_nll_loss(qg, pg, ng, scale=50.0, mask_false_negatives=True, gather=False,
                                      symmetric=symmetric)
    full.backward()
    torch.testing.assert_close((r0[0] + r1[0]) / 2, full.detach())
    for i, ref in enumerate((qg.grad, pg.grad, ng.grad)):
        torch.testing.assert_close(torch.cat([r0[1][i], r1[1][i]]) / 2, ref)


# ---------------------------------------------------------------------------------------------- scored pairs
_GOLD = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 0.3, 0.7, 1.0], dtype=torch.float64)  # ties included


@pytest.mark.parametrize("width", [9, 8], ids=["odd-width", "even-width"])
@pytest.mark.parametrize("loss", ["cosent", "angle", "cosine"])
def test_scored_pair_losses_match_twin(loss, width):
    """CoSENT, AnglE and cosine MSE against the written-out twin (pairs of pairs one at a time; AnglE through
    complex arithmetic): values and gradients, plain and Matryoshka with unequal weights."""
    from llm2vec_fast.training.losses import scored_pair_loss, scored_pair_loss_ref

    a, b = _reps(9, width, 20), _reps(9, width, 21)
    for kw in ({}, dict(matryoshka_dims=[width, 5, 2], matryoshka_weights=[1.0, 0.5, 2.0])):
        ours = scored_pair_loss(a, b, _GOLD, loss, scale=20.0, **kw)
        ref = scored_pair_loss_ref(a, b, _GOLD, loss, scale=20.0, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        for x, y in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(ref, (a, b)), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["cosent", "angle", "cosine"])
def test_scored_pair_losses_equal_sentence_transformers(loss):
    """The same numbers as sentence-transformers' CoSENTLoss, AnglELoss and CosineSimilarityLoss on the same
    embeddings (values and gradients), odd width included."""
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    from llm2vec_fast.training.losses import scored_pair_loss

    cls = {"cosent": "CoSENTLoss", "angle": "AnglELoss", "cosine": "CosineSimilarityLoss"}[loss]
    st = getattr(st_losses, cls)(model=torch.nn.Module())
    if not hasattr(st, "compute_loss_from_embeddings"):
        pytest.skip(f"this sentence-transformers' {cls} has no compute_loss_from_embeddings")
    gold = _GOLD.float().double()  # CosineSimilarityLoss reads its labels as float32
    for width in (9, 8):
        a, b = _reps(9, width, 30), _reps(9, width, 31)
        ours = scored_pair_loss(a, b, gold, loss)
        theirs = st.compute_loss_from_embeddings([a, b], gold)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        for x, y in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(theirs, (a, b)), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_cosent_reads_only_the_order_of_the_scores():
    """CoSENT is unchanged by any increasing map of the gold scores, is log 2 for two pairs of equal similarity, and
    goes to 0 as the similarities follow the gold order by a wide margin; pairs of equal gold are never compared."""
    from llm2vec_fast.training.losses import cosent_loss

    a, b = _reps(9, 6, 40), _reps(9, 6, 41)
    base = cosent_loss(a, b, _GOLD)
    torch.testing.assert_close(cosent_loss(a, b, 5 * _GOLD ** 3 - 1), base, rtol=0, atol=0)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.isclose(cosent_loss(x, x, torch.tensor([0.0, 1.0])), torch.log(torch.tensor(2.0, dtype=x.dtype)))
    assert cosent_loss(x, x, torch.tensor([0.5, 0.5])) == 0  # a tie: no ordered pair, log(1)
    e = torch.eye(2, dtype=torch.float64)
    far = torch.stack([e[0], e[0]]), torch.stack([e[1], e[0]])  # pair 0: cosine 0; pair 1: cosine 1
    assert cosent_loss(*far, torch.tensor([0.0, 1.0]), scale=50.0) < 1e-20
    assert cosent_loss(*far, torch.tensor([1.0, 0.0]), scale=50.0) > 49


def test_scored_pair_loss_arguments_are_checked():
    from llm2vec_fast.training.losses import pair_similarity, scored_pair_loss

    a = torch.randn(4, 6)
    with pytest.raises(ValueError, match="one of"):
        scored_pair_loss(a, a, torch.zeros(4), "mse")
    with pytest.raises(ValueError, match="one score per pair expected: 4 pairs, scores of shape \\(3,\\)"):
        scored_pair_loss(a, a, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        scored_pair_loss(a, a[:, :4], torch.zeros(4))
    with pytest.raises(ValueError, match="more than the embedding width 6"):
        scored_pair_loss(a, a, torch.zeros(4), matryoshka_dims=[8])
    with pytest.raises(ValueError, match="'cosine' or 'angle'"):
        pair_similarity(a, a, "dot")


def test_cosent_on_a_large_batch_equals_the_pairwise_form():
    """The sorted, running log-sum-exp CoSENT equals the B × B pairwise formula (value and gradient) on a batch of
    1,500 pairs with many tied gold scores."""
    from llm2vec_fast.training.losses import cosent_loss, pair_similarity

    a, b = _reps(1500, 12, 50), _reps(1500, 12, 51)
    gold = torch.round(torch.rand(1500, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10) / 10
    s = pair_similarity(a, b) * 20.0
    pairwise = (s[None, :] - s[:, None]).masked_fill(~(gold[:, None] > gold[None, :]), float("-inf"))
    ref = torch.logsumexp(torch.cat([s.new_zeros(1), pairwise.reshape(-1)]), dim=0)
    ours = cosent_loss(a, b, gold)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for x, y in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(ref, (a, b)), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("with_neg", [False, True], ids=["in-batch", "hard-neg"])
def test_symmetric_loss_matches_twin_and_sentence_transformers(with_neg):
    """The symmetric InfoNCE (query → candidates and positive → queries, averaged): values and gradients against the
    twin (false-negative masking and Matryoshka included), and the value of sentence-transformers' symmetric loss."""
    q, p = _reps(6, 9, 60), _reps(6, 9, 61)
    n = _reps(6, 9, 62) if with_neg else None
    for kw in ({}, dict(mask_false_negatives=True), dict(matryoshka_dims=[9, 4], matryoshka_weights=[1.0, 0.5])):
        ours = hard_negative_nll_loss(q, p, n, scale=20.0, symmetric=True, **kw)
        ref = hard_negative_nll_loss_ref(q, p, n, scale=20.0, symmetric=True, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        inputs = (q, p) if n is None else (q, p, n)
        for x, y in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    # the reverse direction counts: swapping queries and positives changes the one-way loss, not the symmetric one
    assert not torch.isclose(hard_negative_nll_loss(q, p, scale=20.0), hard_negative_nll_loss(p, q, scale=20.0))
    torch.testing.assert_close(hard_negative_nll_loss(q, p, scale=20.0, symmetric=True),
                               hard_negative_nll_loss(p, q, scale=20.0, symmetric=True))
    st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        st = st_losses.MultipleNegativesSymmetricRankingLoss(model=torch.nn.Module(), scale=20.0)
    if not hasattr(st, "compute_loss_from_embeddings"):
        pytest.skip("this sentence-transformers' symmetric loss has no compute_loss_from_embeddings")
    emb = [q, p] if n is None else [q, p, n]
    torch.testing.assert_close(hard_negative_nll_loss(*emb, scale=20.0, symmetric=True),
                               st.compute_loss_from_embeddings(emb, None), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- GISTEmbed
def _gist_case(with_neg, seed=70):
    """Model and guide embeddings where the guide sees near-duplicates: texts 1 and 2 share a guide vector with the
    positive of query 0, so the filter has something to remove."""
    q, p = _reps(6, 9, seed), _reps(6, 9, seed + 1)
    n = _reps(6, 9, seed + 2) if with_neg else None
    g = torch.Generator().manual_seed(seed + 3)
    gq, gp = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    gp[1] = gp[0] + 0.01  # positive 1 looks, to the guide, like query 0's own positive
    gq[2] = gp[0] * 2  # and so does query 2
    gn = torch.randn(6, 5, generator=g, dtype=torch.float64) if with_neg else None
    if with_neg:
        gn[3] = gp[0]
    return q, p, n, gq, gp, gn


@pytest.mark.parametrize("with_neg", [False, True], ids=["in-batch", "hard-neg"])
@pytest.mark.parametrize("kw", [{}, dict(margin=0.1), dict(margin=0.2, margin_strategy="relative"),
                                dict(contrast_anchors=False, contrast_positives=False)],
                         ids=["default", "absolute-margin", "relative-margin", "pairs-only"])
def test_gist_loss_matches_twin(with_neg, kw):
    from llm2vec_fast.training.losses import gist_loss, gist_loss_ref

    q, p, n, gq, gp, gn = _gist_case(with_neg)
    ours = gist_loss(q, p, n, gq, gp, gn, scale=20.0, **kw)
    ref = gist_loss_ref(q, p, n, gq, gp, gn, scale=20.0, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    inputs = (q, p) if n is None else (q, p, n)
    for x, y in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    # the guide does filter: a margin that lets every candidate through gives another loss
    unfiltered = gist_loss(q, p, n, gq, gp, gn, scale=20.0, **{**kw, "margin": -10.0, "margin_strategy": "absolute"})
    assert not torch.isclose(ours, unfiltered)


@pytest.mark.parametrize("with_neg", [False, True], ids=["in-batch", "hard-neg"])
def test_gist_loss_equals_sentence_transformers(with_neg):
    """The value of sentence-transformers' GISTEmbedLoss on the same model and guide embeddings (its forward, with
    the embedding step replaced by these tensors), plain and with a relative margin."""
    gist_mod = pytest.importorskip("sentence_transformers.sentence_transformer.losses.gist_embed")
    from llm2vec_fast.training.losses import gist_loss

    q, p, n, gq, gp, gn = _gist_case(with_neg)
    model, guide = object(), object()
    table = {id(model): [q, p] + ([n] if with_neg else []), id(guide): [gq, gp] + ([gn] if with_neg else [])}
    for kw in ({}, dict(margin=0.2, margin_strategy="relative"), dict(contrast_anchors=False)):
        st = gist_mod.GISTEmbedLoss.__new__(gist_mod.GISTEmbedLoss)
        torch.nn.Module.__init__(st)
        st.model, st.guide, st.temperature = model, guide, 0.05
        st.similarity_fct = torch.nn.CosineSimilarity(dim=-1)
        st.must_retokenize, st.gather_across_devices = False, False
        st.margin_strategy, st.margin = kw.get("margin_strategy", "absolute"), kw.get("margin", 0.0)
        st.contrast_anchors, st.contrast_positives = kw.get("contrast_anchors", True), True
        st.cross_entropy_loss = torch.nn.CrossEntropyLoss()
        orig = gist_mod.embed_columns
        gist_mod.embed_columns = lambda m, feats: [t.clone() for t in table[id(m)]]
        try:
            theirs = st([{} for _ in table[id(model)]], None)
        finally:
            gist_mod.embed_columns = orig
        ours = gist_loss(q, p, n, gq, gp, gn, scale=20.0, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
