"""Packed bidirectional flash attention (kernels/attention.py) against its PyTorch twin.

CPU runs go through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are tiny and each
parametrisation is chosen to cover one axis (head dim, head grouping, softcap, dtype, strides) rather than the full
product. bf16 and larger shapes are @pytest.mark.gpu.
"""
import math
import os

import pytest
import torch
from llm2vec_fast.kernels import attention as attn
from llm2vec_fast.kernels.attention import dropout_keep_mask, flash_attention
from llm2vec_fast.kernels.reference import flash_attention_ref

from .helpers import compile_for_hopper

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# one pack mixing a length-1 segment, an empty one, partial blocks and a segment spanning several blocks
LENS = (1, 7, 63, 0, 97, 130)


def _cu(lens, device=DEV):
    cu = [0]
    for l in lens:
        cu.append(cu[-1] + l)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _inputs(lens, hq, hkv, d, dtype, fused=False, qscale=1.0, seed=0):
    """q, k, v packed. ``fused="qkv"``: strided views of one [T, hq + 2·hkv, d] projection; ``fused="hf"``: views of
    Hugging Face's [1, H, T, d] attention layout (token stride d, head stride T·d). No copies either way."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    if fused == "hf":
        q = (torch.randn(1, hq, T, d, generator=g) * qscale).to(DEV, dtype)[0].transpose(0, 1)
        k = torch.randn(1, hkv, T, d, generator=g).to(DEV, dtype)[0].transpose(0, 1)
        v = torch.randn(1, hkv, T, d, generator=g).to(DEV, dtype)[0].transpose(0, 1)
    elif fused:
        qkv = torch.randn(T, hq + 2 * hkv, d, generator=g).to(DEV, dtype)
        q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
        q = q * qscale if qscale != 1.0 else q
    else:
        q = (torch.randn(T, hq, d, generator=g) * qscale).to(DEV, dtype)
        k = torch.randn(T, hkv, d, generator=g).to(DEV, dtype)
        v = torch.randn(T, hkv, d, generator=g).to(DEV, dtype)
    do = torch.randn(T, hq, d, generator=g).to(DEV, dtype)
    return q, k, v, do


def _run(fn, q, k, v, do, cu, max_seqlen, **kw):
    """Forward (with lse) and the three gradients of <o, do>."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o, lse = fn(q, k, v, cu, max_seqlen, return_lse=True, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, lse, dq, dk, dv


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    # GPU runs are time-boxed: take each head dim's first tile instead of compiling and timing all of them (parity
    # does not depend on the tile; the benchmark tunes). An explicit LLM2VEC_FAST_AUTOTUNE wins.
    if "LLM2VEC_FAST_AUTOTUNE" not in os.environ:
        monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")


@pytest.fixture
def poison(monkeypatch):
    # every buffer the kernels allocate starts as NaN: an element they forget to write fails the comparison
    monkeypatch.setattr(attn, "_POISON_OUTPUTS", True)


CASES_FP32 = [
    pytest.param(64, 2, 2, 0.0, False, id="D64-HQ2-H2-mha"),
    pytest.param(80, 4, 1, 0.0, "qkv", id="D80-HQ4-H1-mqa-fusedqkv"),
    pytest.param(128, 4, 1, 0.0, "hf", id="D128-HQ4-H1-gqa4-hflayout"),
    pytest.param(80, 8, 2, 2.0, False, id="D80-HQ8-H2-gqa4-softcap"),
]


@pytest.mark.parametrize("d, hq, hkv, softcap, fused", CASES_FP32)
def test_fp32_matches_reference(poison, d, hq, hkv, softcap, fused):
    cu = _cu(LENS)
    # a larger q scale pushes scores into the softcap's non-linear range
    q, k, v, do = _inputs(LENS, hq, hkv, d, torch.float32, fused=fused, qscale=3.0 if softcap else 1.0)
    ours = _run(flash_attention, q, k, v, do, cu, max(LENS), softcap=softcap)
    ref = _run(flash_attention_ref, q, k, v, do, cu, max(LENS), softcap=softcap)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert ours[0].shape == (sum(LENS), hq, d) and ours[1].shape == (hq, sum(LENS))


def _check_lowp(ours, ref32, ref_lp, names, factors):
    for name, a, b32, blp, fac in zip(names, ours, ref32, ref_lp, factors, strict=True):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
        err = (a.float() - b32.float()).abs().max().item()
        err_lp = (blp.float() - b32.float()).abs().max().item()
        atol = 1e-3 * max(1.0, b32.float().abs().max().item())
        assert err <= fac * err_lp + atol, f"{name}: max err {err:.3g} > {fac}·{err_lp:.3g} + {atol:.2g}"


CASES_LP = [
    pytest.param(128, 4, 1, 0.0, torch.float16, id="D128-HQ4-H1-gqa4-fp16"),
    pytest.param(64, 2, 2, 2.0, torch.float16, id="D64-HQ2-H2-mha-softcap-fp16"),
    pytest.param(128, 4, 1, 0.0, torch.bfloat16, id="D128-HQ4-H1-gqa4-bf16", marks=pytest.mark.gpu),
    pytest.param(80, 6, 2, 2.0, torch.bfloat16, id="D80-HQ6-H2-gqa3-softcap-bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("d, hq, hkv, softcap, dtype", CASES_LP)
def test_low_precision_within_twice_reference_error(poison, d, hq, hkv, softcap, dtype):
    cu = _cu(LENS)
    q, k, v, do = _inputs(LENS, hq, hkv, d, dtype, qscale=3.0 if softcap else 1.0)
    ours = _run(flash_attention, q, k, v, do, cu, max(LENS), softcap=softcap)
    ref32 = _run(flash_attention_ref, q.float(), k.float(), v.float(), do.float(), cu, max(LENS), softcap=softcap)
    ref_lp = _run(flash_attention_ref, q, k, v, do, cu, max(LENS), softcap=softcap, _upcast=False)
    _check_lowp(ours, ref32, ref_lp, ("o", "lse", "dq", "dk", "dv"), (2, 2, 3, 3, 3))


@pytest.mark.parametrize("fused, causal", [(False, False), ("hf", False), (False, True)],
                         ids=["packed", "hflayout", "packed-causal"])
def test_tma_forward_matches_reference(poison, monkeypatch, fused, causal):
    """The opt-in Hopper TMA forward (per-sequence tensor descriptors) against the reference, fp16."""
    monkeypatch.setattr(attn, "_FORCE_TMA", True)
    cu = _cu(LENS)
    q, k, v, _ = _inputs(LENS, 4, 1, 64, torch.float16, fused=fused)
    if not attn._use_tma(q):
        pytest.skip("no tensor descriptors in this triton / not a Hopper GPU")
    o, lse = flash_attention(q, k, v, cu, max(LENS), return_lse=True, causal=causal)
    o32, lse32 = flash_attention_ref(q.float(), k.float(), v.float(), cu, max(LENS), return_lse=True, causal=causal)
    o_lp = flash_attention_ref(q, k, v, cu, max(LENS), _upcast=False, causal=causal)
    _check_lowp((o, lse), (o32, lse32), (o_lp, lse32 + 0), ("o", "lse"), (2, 2))


def test_custom_scale_and_lse_only_rows_of_each_sequence():
    lens = (5, 33)
    cu = _cu(lens)
    q, k, v, _ = _inputs(lens, 2, 1, 64, torch.float32, seed=3)
    o, lse = flash_attention(q, k, v, cu, 40, scale=0.3, return_lse=True)
    o_ref, lse_ref = flash_attention_ref(q, k, v, cu, 40, scale=0.3, return_lse=True)
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=1e-4)
    # attention never crosses a boundary: changing the second sequence leaves the first one's output untouched
    k2 = k.clone()
    k2[5:] += 1.0
    torch.testing.assert_close(flash_attention(q, k2, v, cu, 40, scale=0.3)[:5], o[:5], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# causal (the decoder's own attention on the packed layout)
# ---------------------------------------------------------------------------------------------------------------------
def _check_against_reference(q, k, v, do, cu, max_seqlen, **kw):
    """Forward, lse and the three gradients against the twin: fp32 tightly, fp16/bf16 by the 2×/3× rule. Returns
    ours (o, lse, dq, dk, dv)."""
    ours = _run(flash_attention, q, k, v, do, cu, max_seqlen, **kw)
    names = ("o", "lse", "dq", "dk", "dv")
    if q.dtype == torch.float32:
        ref = _run(flash_attention_ref, q, k, v, do, cu, max_seqlen, **kw)
        for name, a, b in zip(names, ours, ref, strict=True):
            assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    else:
        ref32 = _run(flash_attention_ref, q.float(), k.float(), v.float(), do.float(), cu, max_seqlen, **kw)
        ref_lp = _run(flash_attention_ref, q, k, v, do, cu, max_seqlen, _upcast=False, **kw)
        _check_lowp(ours, ref32, ref_lp, names, (2, 2, 3, 3, 3))
    return ours


CASES_CAUSAL = [
    pytest.param(64, 2, 2, 0.0, torch.float32, id="D64-HQ2-H2-mha-fp32"),
    pytest.param(80, 8, 2, 2.0, torch.float32, id="D80-HQ8-H2-gqa4-softcap-fp32"),
    pytest.param(128, 4, 1, 0.0, torch.float16, id="D128-HQ4-H1-gqa4-fp16"),
    pytest.param(96, 6, 2, 0.0, torch.bfloat16, id="D96-HQ6-H2-gqa3-bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("d, hq, hkv, softcap, dtype", CASES_CAUSAL)
def test_causal_matches_reference(poison, d, hq, hkv, softcap, dtype):
    cu = _cu(LENS)
    q, k, v, do = _inputs(LENS, hq, hkv, d, dtype, qscale=3.0 if softcap else 1.0, seed=d)
    kw = dict(softcap=softcap, causal=True)
    ours = _check_against_reference(q, k, v, do, cu, max(LENS), **kw)
    # really causal: each sequence's first token sees only itself, and the output differs from bidirectional
    first = _cu(LENS)[:-1][torch.tensor(LENS, device=DEV) > 0].long()
    g = hq // hkv
    torch.testing.assert_close(ours[0][first].float(), v[first].float().repeat_interleave(g, 1), atol=1e-3, rtol=0)
    bi = flash_attention(q, k, v, cu, max(LENS), softcap=softcap)
    assert (bi.float() - ours[0].float()).abs().max() > 0.1


def test_causal_keys_after_the_query_do_not_matter():
    # changing the last key of a sequence changes only that token's own output row under causal attention
    lens = (70, 5)
    cu = _cu(lens)
    q, k, v, _ = _inputs(lens, 2, 1, 64, torch.float32, seed=4)
    o = flash_attention(q, k, v, cu, 70, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[69] += 1.0
    v2[69] -= 1.0
    o2 = flash_attention(q, k2, v2, cu, 70, causal=True)
    torch.testing.assert_close(o2[:69], o[:69], atol=0, rtol=0)
    torch.testing.assert_close(o2[70:], o[70:], atol=0, rtol=0)
    assert not torch.allclose(o2[69], o[69])


def test_causal_dropout_matches_reference_with_the_kernels_mask(poison):
    cu = _cu(DROP_LENS)
    q, k, v, do = _inputs(DROP_LENS, 4, 2, 32, torch.float32, seed=6)
    mask = dropout_keep_mask(91, 0.3, 4, sum(DROP_LENS), DEV)
    ours = _run(flash_attention, q, k, v, do, cu, 70, dropout_p=0.3, seed=91, causal=True)
    ref = _run(flash_attention_ref, q, k, v, do, cu, 70, dropout_p=0.3, _dropout_mask=mask, causal=True)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# GQA-packed rows (PACK): the query tiles of the forward, dQ and dK/dV kernels hold the G query heads of a kv head
# interleaved token by token. The autotuner picks the layout on the GPU; here _FORCE_PACK runs it under the interpreter.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def packed(monkeypatch):
    monkeypatch.setattr(attn, "_FORCE_PACK", True)
    for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
        # tuning choices made under the flag go to a scratch cache and are dropped with it
        monkeypatch.setattr(kernel, "cache", {})


CASES_PACK = [
    # G = 3 and 4 do not divide the 64-row tile into whole tokens; MQA packs every head; G = 1 is the trivial pack
    pytest.param(80, 6, 2, 0.0, False, torch.float32, id="D80-HQ6-H2-gqa3-fp32"),
    pytest.param(64, 4, 1, 2.0, False, torch.float32, id="D64-HQ4-H1-mqa-softcap-fp32"),
    pytest.param(64, 8, 2, 0.0, True, torch.float32, id="D64-HQ8-H2-gqa4-causal-fp32"),
    pytest.param(32, 2, 2, 0.0, True, torch.float32, id="D32-HQ2-H2-mha-causal-fp32"),
    pytest.param(128, 4, 1, 0.0, False, torch.float16, id="D128-HQ4-H1-mqa-fp16"),
    pytest.param(96, 6, 2, 2.0, True, torch.bfloat16, id="D96-HQ6-H2-gqa3-softcap-causal-bf16",
                 marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("d, hq, hkv, softcap, causal, dtype", CASES_PACK)
def test_gqa_packed_rows_match_reference(poison, packed, d, hq, hkv, softcap, causal, dtype):
    cu = _cu(LENS)
    q, k, v, do = _inputs(LENS, hq, hkv, d, dtype, fused="qkv", qscale=3.0 if softcap else 1.0, seed=d + hq)
    kw = dict(softcap=softcap, causal=causal)
    _check_against_reference(q, k, v, do, cu, max(LENS), **kw)


def test_gqa_packed_rows_equal_per_head_rows(monkeypatch, packed):
    """Each row meets the same key blocks in the same order in both layouts, so they agree to float rounding (the
    matmuls of differently shaped tiles round differently), dropout included: its counter is the row's head and
    token, not its tile slot, so both layouts draw the same bits."""
    lens = (1, 40, 70, 9)
    cu = _cu(lens)
    q, k, v, do = _inputs(lens, 6, 2, 32, torch.float32, seed=3)
    kw = dict(dropout_p=0.3, seed=5, causal=False)
    ours = _run(flash_attention, q, k, v, do, cu, 70, **kw)
    monkeypatch.setattr(attn, "_FORCE_PACK", False)
    per_head = _run(flash_attention, q, k, v, do, cu, 70, **kw)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, per_head, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_gqa_packed_rows_dropout_matches_reference_with_the_kernels_mask(poison, packed):
    cu = _cu(DROP_LENS)
    q, k, v, do = _inputs(DROP_LENS, 4, 1, 32, torch.float32, seed=8)
    mask = dropout_keep_mask(13, 0.3, 4, sum(DROP_LENS), DEV)
    for causal in (False, True):
        ours = _run(flash_attention, q, k, v, do, cu, 70, dropout_p=0.3, seed=13, causal=causal)
        ref = _run(flash_attention_ref, q, k, v, do, cu, 70, dropout_p=0.3, _dropout_mask=mask, causal=causal)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
            assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# Multi-sequence tiles (MULTI): the forward's and dQ's tiles hold consecutive rows of the whole pack (dK/dV's
# consecutive keys), several short sequences each, every score masked to its row's own sequence. The autotuner weighs
# them against per-sequence tiles for sentence-length packs on the GPU; _FORCE_MULTI runs them under the interpreter.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def multi(monkeypatch):
    monkeypatch.setattr(attn, "_FORCE_MULTI", True)
    for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "cache", {})


# sentences: many sequences per 64-row tile, a length-1 and an empty one, one crossing two tiles
SHORT_LENS = (3, 1, 5, 9, 0, 2, 17, 30, 4, 70, 6)

CASES_MULTI = [
    pytest.param(SHORT_LENS, 64, 2, 2, 0.0, False, False, torch.float32, id="short-D64-mha-fp32"),
    pytest.param(SHORT_LENS, 80, 6, 2, 2.0, False, True, torch.float32, id="short-D80-gqa3-packed-softcap-fp32"),
    pytest.param(SHORT_LENS, 64, 8, 2, 0.0, True, True, torch.float32, id="short-D64-gqa4-packed-causal-fp32"),
    pytest.param(SHORT_LENS, 32, 4, 1, 0.0, True, False, torch.float32, id="short-D32-mqa-causal-fp32"),
    pytest.param(LENS, 64, 6, 2, 0.0, False, True, torch.float32, id="LENS-D64-gqa3-packed-fp32"),
    pytest.param(SHORT_LENS, 128, 4, 1, 0.0, False, True, torch.float16, id="short-D128-mqa-packed-fp16"),
    pytest.param(SHORT_LENS, 96, 6, 2, 2.0, True, True, torch.bfloat16, id="short-D96-gqa3-softcap-causal-bf16",
                 marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("lens, d, hq, hkv, softcap, causal, pack, dtype", CASES_MULTI)
def test_multi_sequence_tiles_match_reference(poison, multi, monkeypatch, lens, d, hq, hkv, softcap, causal, pack,
                                              dtype):
    monkeypatch.setattr(attn, "_FORCE_PACK", pack)
    cu = _cu(lens)
    q, k, v, do = _inputs(lens, hq, hkv, d, dtype, qscale=3.0 if softcap else 1.0, seed=11)
    _check_against_reference(q, k, v, do, cu, max(lens), softcap=softcap, causal=causal)


@pytest.mark.parametrize("pack", [False, True])
def test_multi_sequence_tiles_equal_per_sequence_tiles_dropout_included(monkeypatch, pack):
    """The same rows meet the same keys, in other blocks: equal to float rounding; dropout's counter is the row's head
    and token and the key's token, not a tile slot, so both draw the same bits (the backward, per sequence, then
    regenerates the forward's mask)."""
    monkeypatch.setattr(attn, "_FORCE_PACK", pack)
    cu = _cu(SHORT_LENS)
    q, k, v, do = _inputs(SHORT_LENS, 6, 2, 32, torch.float32, seed=4)
    kw = dict(dropout_p=0.3, seed=21)

    def run(force):
        # the tuner's choices are keyed without the flags: a fresh scratch cache per forced choice (on the GPU the
        # second run would otherwise reuse the first one's tiles)
        monkeypatch.setattr(attn, "_FORCE_MULTI", force)
        for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
            monkeypatch.setattr(kernel, "cache", {})
        return _run(flash_attention, q, k, v, do, cu, max(SHORT_LENS), **kw)

    per_seq, tiled = run(False), run(True)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), tiled, per_seq, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_multi_sequence_tiles_leave_windows_to_per_sequence_tiles(poison, multi):
    """A local window keeps the per-sequence tiles (they visit only the band's blocks): forcing MULTI changes
    nothing there."""
    cu = _cu(SHORT_LENS)
    q, k, v, do = _inputs(SHORT_LENS, 4, 2, 32, torch.float32, seed=6)
    _check_against_reference(q, k, v, do, cu, max(SHORT_LENS), window_size=(3, 2))


def test_multi_sequence_bounds_and_their_cache():
    cu = _cu((2, 0, 3))
    sb = attn._seq_bounds(cu, 5)
    assert sb.tolist() == [0, 0, 2, 2, 2, 2, 2, 5, 5, 5]
    attn._seq_info(cu, 5, 3)  # the pack's validated launch order: its bounds are kept with it
    assert attn._seq_bounds(cu, 5) is attn._seq_bounds(cu, 5)
    cu[1] = 1  # an in-place edit: new bounds
    attn._seq_info(cu, 5, 3)
    assert attn._seq_bounds(cu, 5).tolist() == [0, 1, 2, 2, 2, 1, 2, 5, 5, 5]


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_multi_sequence_tiles_are_offered_for_sentences_only(monkeypatch, kind):
    """The pointer forward's candidates: the multi-sequence tiles join the per-sequence ones for the sentence bucket
    (the first of them second in line, so a limited tuning run weighs both kinds), never for longer packs or with a
    window; _FORCE_MULTI keeps one kind."""
    import triton

    monkeypatch.delenv("LLM2VEC_FAST_AUTOTUNE", raising=False)
    configs = [triton.Config({"BM": BM, "BN": BN, "PACK": p, "MULTI": m}, num_warps=w, num_stages=s)
               for c in attn._CLASSES for BM, BN, w, s, m in attn._class_tiles(kind, c, multi=True)
               for p in (False, True)]
    prune = attn._prune(kind, pack=True, multi=True)

    def got(**kw):
        return [c.kwargs["MULTI"] for c in prune(configs, {"G": kw.pop("G", 4)}, BD=128, **kw)]

    assert not any(got(SEQ_BUCKET=1024)) and not any(got(SEQ_BUCKET=8193))
    short = got(SEQ_BUCKET=256)
    assert short.count(True) == 2 * len(attn._MULTI_TILES[kind][128]) and short[:2] == [False, True]
    assert got(SEQ_BUCKET=257) == short
    assert not any(got(SEQ_BUCKET=256, HAS_WINDOW=True))
    monkeypatch.setattr(attn, "_FORCE_MULTI", True)
    assert all(got(SEQ_BUCKET=1024)) and got(SEQ_BUCKET=256, PREC="ieee") == [True]
    # a head-dim class without multi-sequence tiles (256) keeps its per-sequence ones rather than none
    d256 = [c.kwargs["MULTI"] for c in prune(configs, {"G": 4}, BD=256, SEQ_BUCKET=256)]
    assert d256 and not any(d256)
    assert got(SEQ_BUCKET=256, PREC="ieee", HAS_WINDOW=True) == [False]
    monkeypatch.setattr(attn, "_FORCE_MULTI", False)
    assert not any(got(SEQ_BUCKET=256))
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "2")
    assert got(SEQ_BUCKET=256) == [False, False]  # forced off: only per-sequence tiles, limited to two
    monkeypatch.setattr(attn, "_FORCE_MULTI", None)
    assert got(SEQ_BUCKET=256) == [False, True]


# ---------------------------------------------------------------------------------------------------------------------
# local window (window_size, FlashAttention's convention): query i sees keys i - left .. i + right of its sequence
# ---------------------------------------------------------------------------------------------------------------------
CASES_WINDOW = [
    # symmetric (a Gemma sliding window bidirectionally), lopsided, one side unlimited, causal with a window, a window
    # wider than every sequence (= full attention); per-head and GQA-packed rows, fp32 and fp16
    pytest.param((5, 5), False, 2, 2, False, torch.float32, id="sym5-mha-fp32"),
    pytest.param((40, 3), False, 6, 2, True, torch.float32, id="left40-right3-gqa3-packed-fp32"),
    pytest.param((0, -1), False, 4, 1, False, torch.float32, id="keys-at-or-after-mqa-fp32"),
    pytest.param((16, 0), True, 6, 2, True, torch.float32, id="causal16-gqa3-packed-fp32"),
    pytest.param((3, -1), True, 2, 2, False, torch.float32, id="causal3-right-unlimited-fp32"),
    pytest.param((200, 200), False, 4, 2, False, torch.float32, id="wider-than-any-sequence-fp32"),
    pytest.param((9, 9), False, 8, 2, True, torch.float16, id="sym9-gqa4-packed-fp16"),
    pytest.param((31, 31), False, 8, 2, True, torch.bfloat16, id="sym31-gqa4-packed-bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("window, causal, hq, hkv, pack, dtype", CASES_WINDOW)
def test_window_matches_reference(poison, monkeypatch, window, causal, hq, hkv, pack, dtype):
    monkeypatch.setattr(attn, "_FORCE_PACK", pack)
    for kernel in (attn._attn_fwd_kernel, attn._attn_bwd_dkdv_kernel, attn._attn_bwd_dq_kernel):
        monkeypatch.setattr(kernel, "cache", {})
    cu = _cu(LENS)
    q, k, v, do = _inputs(LENS, hq, hkv, 32, dtype, seed=hq + window[0])
    ours = _check_against_reference(q, k, v, do, cu, max(LENS), causal=causal, window_size=window)
    full = flash_attention(q, k, v, cu, max(LENS), causal=causal)
    if window == (200, 200):
        torch.testing.assert_close(ours[0], full, atol=0, rtol=0)  # the same blocks, the same order
    else:
        assert (full.float() - ours[0].float()).abs().max() > 0.05  # the window changes the output


def test_window_visits_only_the_blocks_of_the_band():
    """Keys and queries far outside every window of a tile are never read: NaN at both ends of a sequence leaves the
    middle tiles' outputs and gradients equal to a clean run's (a kernel that loaded those blocks would mix 0 · NaN
    into them). Interpreter tiles: forward and dQ 64 query rows × 32 keys, dK/dV 64 keys × 32 query rows. With window
    (4, 6), query tiles [128, 256) read keys [124, 262) only, and key tiles [128, 256) query rows [96, 288), whose
    outputs (the backward's row statistics) come from keys [92, 294): all clean."""
    L = 400
    cu = _cu((L,))
    clean = _inputs((L,), 2, 1, 32, torch.float32, seed=2)
    dirty = [t.clone() for t in clean]
    for t in dirty:
        t[:10] = float("nan")
        t[360:] = float("nan")
    outs = []
    for q, k, v, do in (clean, dirty):
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        o = flash_attention(q, k, v, cu, L, window_size=(4, 6))
        outs.append((o, *torch.autograd.grad(o, (q, k, v), do)))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *outs, strict=True):
        assert b[:10].isnan().any(), name  # the NaN did reach the tiles that read it
        torch.testing.assert_close(b[128:256], a[128:256], atol=0, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_window_dropout_matches_reference_with_the_kernels_mask(poison):
    cu = _cu(DROP_LENS)
    q, k, v, do = _inputs(DROP_LENS, 4, 2, 32, torch.float32, seed=9)
    mask = dropout_keep_mask(17, 0.3, 4, sum(DROP_LENS), DEV)
    kw = dict(dropout_p=0.3, window_size=(7, 7))
    ours = _run(flash_attention, q, k, v, do, cu, 70, seed=17, **kw)
    ref = _run(flash_attention_ref, q, k, v, do, cu, 70, _dropout_mask=mask, **kw)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window", [(3,), (1, -2), (1.0, 2), [True, 1], "4", None], ids=str)
@pytest.mark.parametrize("fn", [flash_attention, flash_attention_ref], ids=["kernel", "twin"])
def test_bad_window_size_raises(fn, window):
    cu = _cu((5,))
    q, k, v, _ = _inputs((5,), 2, 1, 32, torch.float32)
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\), two ints >= 0 or -1"):
        fn(q, k, v, cu, 5, window_size=window)


# ---------------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------------
DROP_LENS = (1, 40, 70)


def test_dropout_deterministic_per_seed_and_seed_sensitive():
    cu = _cu(DROP_LENS)
    q, k, v, _ = _inputs(DROP_LENS, 2, 1, 32, torch.float32)
    a = flash_attention(q, k, v, cu, 70, dropout_p=0.3, seed=1234)
    b = flash_attention(q, k, v, cu, 70, dropout_p=0.3, seed=1234)
    c = flash_attention(q, k, v, cu, 70, dropout_p=0.3, seed=1235)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # seed=None draws from torch's generator, so torch.manual_seed makes it reproducible
    torch.manual_seed(7)
    d = flash_attention(q, k, v, cu, 70, dropout_p=0.3)
    torch.manual_seed(7)
    e = flash_attention(q, k, v, cu, 70, dropout_p=0.3)
    assert torch.equal(d, e) and not torch.equal(d, a)
    # p = 0 is exactly the no-dropout path, whatever the seed
    assert torch.equal(flash_attention(q, k, v, cu, 70, dropout_p=0.0, seed=99), flash_attention(q, k, v, cu, 70))


def test_dropout_keep_fraction_matches_one_minus_p():
    p, H, T = 0.3, 2, 256
    keep = dropout_keep_mask(4321, p, H, T, DEV)
    assert keep.shape == (H, T, T) and keep.dtype == torch.bool
    n = keep.numel()
    frac = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    # no structure across heads or rows: different heads and rows draw different bits
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert torch.equal(keep, dropout_keep_mask(4321, p, H, T, DEV))


def test_dropout_matches_reference_with_the_kernels_mask(poison):
    """Forward and all gradients equal the reference applied with the kernel's own keep-mask."""
    cu = _cu(DROP_LENS)
    T = sum(DROP_LENS)
    q, k, v, do = _inputs(DROP_LENS, 4, 2, 32, torch.float32, seed=5)
    mask = dropout_keep_mask(77, 0.3, 4, T, DEV)
    ours = _run(flash_attention, q, k, v, do, cu, 70, dropout_p=0.3, seed=77, softcap=3.0)
    ref = _run(flash_attention_ref, q, k, v, do, cu, 70, dropout_p=0.3, _dropout_mask=mask, softcap=3.0)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref, strict=True):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) entries"
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_dropout_gradient_matches_finite_differences():
    """The backward regenerates the forward's mask: directional derivatives agree with central differences."""
    lens = (3, 9)
    cu = _cu(lens)
    q, k, v, do = _inputs(lens, 2, 1, 32, torch.float32, seed=11)
    f = lambda q_, k_, v_: (flash_attention(q_, k_, v_, cu, 9, dropout_p=0.5, seed=2024) * do).sum()
    _, _, dq, dk, dv = _run(flash_attention, q, k, v, do, cu, 9, dropout_p=0.5, seed=2024)
    g = torch.Generator().manual_seed(1)
    eps = 1e-2
    for name, grad, idx in (("q", dq, 0), ("k", dk, 1), ("v", dv, 2)):
        xs = [q, k, v]
        dirn = torch.randn(xs[idx].shape, generator=g).to(DEV)
        plus, minus = list(xs), list(xs)
        plus[idx] = xs[idx] + eps * dirn
        minus[idx] = xs[idx] - eps * dirn
        fd = (f(*plus) - f(*minus)).item() / (2 * eps)
        an = (grad * dirn).sum().item()
        assert abs(fd - an) <= 2e-3 * max(1.0, abs(an)), f"d{name}: finite difference {fd:.5f} vs autograd {an:.5f}"


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------
def _valid():
    q, k, v, _ = _inputs((3, 5), 4, 2, 64, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens=_cu((3, 5)), max_seqlen=5)


def _call(**over):
    a = {**_valid(), **over}
    return flash_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"])


BAD = [
    pytest.param(dict(q=torch.zeros(8, 4, 64, dtype=torch.float64)), TypeError, "q.dtype", id="q-float64"),
    pytest.param(dict(k=torch.zeros(8, 2, 64, dtype=torch.float16)), TypeError, "share one dtype", id="k-dtype"),
    pytest.param(dict(q=[1, 2]), TypeError, "torch.Tensor", id="q-not-tensor"),
    pytest.param(dict(q=torch.zeros(8, 256)), ValueError, "total_tokens, heads, head_dim", id="q-2d"),
    pytest.param(dict(q=torch.zeros(8, 64, 4).transpose(1, 2)), ValueError, "contiguous last dimension",
                 id="q-strided-last-dim"),
    pytest.param(dict(q=torch.zeros(8, 3, 64)), ValueError, "multiple of the number of kv heads", id="hq-not-mult"),
    pytest.param(dict(q=torch.zeros(8, 4, 48), k=torch.zeros(8, 2, 48), v=torch.zeros(8, 2, 48)), ValueError,
                 "head_dim must be one of", id="d48"),
    pytest.param(dict(k=torch.zeros(8, 2, 32)), ValueError, "same shape", id="kv-shape"),
    pytest.param(dict(k=torch.zeros(7, 2, 64), v=torch.zeros(7, 2, 64)), ValueError, "total_tokens", id="kv-rows"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, 8])), TypeError, "int32", id="cu-int64"),
    pytest.param(dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start at 0",
                 id="cu-start"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 6, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing",
                 id="cu-decreasing"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "total_tokens",
                 id="cu-last"),
    pytest.param(dict(max_seqlen=4), ValueError, "max_seqlen=4", id="max-seqlen-small"),
    pytest.param(dict(max_seqlen=5.0), TypeError, "max_seqlen", id="max-seqlen-float"),
]


@pytest.mark.parametrize("over, exc, msg", BAD)
def test_invalid_inputs_raise(over, exc, msg):
    over = {n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in over.items()}
    with pytest.raises(exc, match=msg):
        _call(**over)


def test_cu_seqlens_edited_in_place_is_validated_again():
    # validation is cached per cu_seqlens tensor (once per batch, not per layer); an in-place edit must re-validate
    a = _valid()
    cu = a["cu_seqlens"]
    flash_attention(a["q"], a["k"], a["v"], cu, 5)
    cu[1] = 7
    with pytest.raises(ValueError, match="max_seqlen=5"):
        flash_attention(a["q"], a["k"], a["v"], cu, 5)


def test_primed_host_copy_replaces_the_device_copy(monkeypatch):
    """prime_seq_info validates and orders a pack from its host copy; flash_attention over that tensor then reads
    nothing back from the device, gives the same result, and validates again after an in-place change."""
    lens = (5, 0, 17, 9)
    cu = _cu(lens)
    q, k, v, _ = _inputs(lens, 4, 2, 32, torch.float32, seed=2)
    want = flash_attention(q, k, v, cu.clone(), 17)
    calls = []
    real = attn._validate_cu_seqlens
    monkeypatch.setattr(attn, "_validate_cu_seqlens", lambda *a: calls.append(a[0]) or real(*a))
    attn.prime_seq_info(cu, cu.cpu().numpy(), 17)
    assert calls == [[0, 5, 5, 22, 31]]
    torch.testing.assert_close(flash_attention(q, k, v, cu, 17), want, atol=0, rtol=0)
    assert len(calls) == 1  # no device-to-host copy: the primed copy served
    assert attn._SEQ_CACHE["info"][0].tolist() == [2, 3, 0, 1] and attn._SEQ_CACHE["info"][1] == 13
    cu[2] = 4  # an in-place change: validated again from the device copy
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attention(q, k, v, cu, 17)
    with pytest.raises(ValueError, match="max_seqlen=9"):
        attn.prime_seq_info(_cu(lens), [0, 5, 5, 22, 31], 9)
    with pytest.raises(ValueError, match="cu_host has 3 entries"):
        attn.prime_seq_info(_cu(lens), [0, 5, 5], 17)


@pytest.mark.parametrize("fn", [flash_attention, flash_attention_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("window", [(-1, -1), (2, 2)], ids=["full", "window"])
def test_empty_pack(fn, window):
    q = torch.zeros(0, 2, 32, device=DEV, requires_grad=True)
    k = torch.zeros(0, 1, 32, device=DEV, requires_grad=True)
    v = torch.zeros(0, 1, 32, device=DEV, requires_grad=True)
    o, lse = fn(q, k, v, torch.zeros(1, dtype=torch.int32, device=DEV), 0, return_lse=True, window_size=window)
    assert o.shape == (0, 2, 32) and lse.shape == (2, 0)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("kw, msg", [(dict(dropout_p=1.0), "dropout_p"), (dict(softcap=-1.0), "softcap"),
                                     (dict(softcap=float("inf")), "softcap must be a finite number >= 0"),
                                     (dict(softcap=float("nan")), "got nan"),
                                     (dict(scale=0.0), "scale"), (dict(scale=-0.125), "got -0.125"),
                                     (dict(scale=float("inf")), "got inf")],
                         ids=["dropout-1", "softcap-negative", "softcap-inf", "softcap-nan", "scale-0",
                              "scale-negative", "scale-inf"])
@pytest.mark.parametrize("fn", [flash_attention, flash_attention_ref], ids=["kernel", "twin"])
def test_invalid_options_raise(kw, msg, fn):
    # the twin (the CPU backend) raises what the kernel raises
    a = _valid()
    with pytest.raises(ValueError, match=msg):
        fn(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"], **kw)


@pytest.mark.parametrize("over, exc, msg", [b for b in BAD if b.id not in ("q-float64", "q-strided-last-dim", "d48")])
def test_twin_raises_what_the_kernel_raises(over, exc, msg):
    a = {**_valid(), **{n: (x.to(DEV) if isinstance(x, torch.Tensor) else x) for n, x in over.items()}}
    with pytest.raises(exc, match=msg):
        flash_attention_ref(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"])


def test_strided_cu_seqlens_view_is_read_as_its_values():
    lens = (4, 6)
    q, k, v, _ = _inputs(lens, 2, 1, 32, torch.float32, seed=5)
    strided = torch.tensor([0, 5, 4, 6, 10, 7], dtype=torch.int32, device=DEV)[::2]  # values [0, 4, 10]
    assert not strided.is_contiguous()
    torch.testing.assert_close(flash_attention(q, k, v, strided, 6), flash_attention_ref(q, k, v, _cu(lens), 6),
                               atol=1e-5, rtol=1e-5)


def test_inference_mode_cu_seqlens_edited_in_place_is_validated_again():
    # inference tensors have no version counter: an unprimed one is validated at every call
    a = _valid()
    with torch.inference_mode():
        cu = a["cu_seqlens"].clone()
        flash_attention(a["q"], a["k"], a["v"], cu, 5)
        cu[1] = 7
        with pytest.raises(ValueError, match="max_seqlen=5"):
            flash_attention(a["q"], a["k"], a["v"], cu, 5)


def test_device_mismatch_raises():
    a = _valid()
    other = "meta" if DEV == "cpu" else "cpu"  # the check runs before any data is read, so a meta tensor suffices
    with pytest.raises(ValueError, match="one device"):
        flash_attention(a["q"], a["k"], a["v"], a["cu_seqlens"].to(other), a["max_seqlen"])


# ---------------------------------------------------------------------------------------------------------------------
# GPU: bf16, every head dim, bigger shapes, no recompiles
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("d, dtype", [(d, torch.bfloat16) for d in (32, 64, 80, 96, 128, 256)]
                         + [(128, torch.float16)], ids=lambda x: f"D{x}" if isinstance(x, int) else str(x)[6:])
def test_gpu_head_dims_large_pack(poison, d, dtype):
    g = torch.Generator().manual_seed(d)
    lens = torch.randint(1, 1500, (12,), generator=g).tolist() + [1, 2048]
    cu = _cu(lens)
    q, k, v, do = _inputs(lens, 8, 2, d, dtype)
    ours = _run(flash_attention, q, k, v, do, cu, max(lens))
    ref32 = _run(flash_attention_ref, q.float(), k.float(), v.float(), do.float(), cu, max(lens))
    ref_lp = _run(flash_attention_ref, q, k, v, do, cu, max(lens), _upcast=False)
    _check_lowp(ours, ref32, ref_lp, ("o", "lse", "dq", "dk", "dv"), (2, 2, 3, 3, 3))


@pytest.mark.gpu
def test_gpu_fp32_is_not_tf32():
    cu = _cu(LENS)
    q, k, v, do = _inputs(LENS, 4, 2, 128, torch.float32, qscale=4.0)
    ours = _run(flash_attention, q, k, v, do, cu, max(LENS))
    ref = _run(flash_attention_ref, q, k, v, do, cu, max(LENS))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_new_lengths_do_not_recompile():
    q, k, v, _ = _inputs((600,), 4, 2, 64, torch.bfloat16)
    kernel = attn._attn_fwd_kernel.fn  # the JITFunction under the autotuner

    def n_compiled():
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        return sum(len(c[0]) if isinstance(c, tuple) else len(c) for c in caches.values())

    def call(lens):
        T = sum(lens)
        flash_attention(q[:T], k[:T], v[:T], _cu(lens), max(lens))

    # every pack below stays in one autotune bucket (work-weighted length 257..1024), so only T and cu_seqlens change
    call((300,))
    before = n_compiled()
    for lens in ((280, 290), (1, 299), (37, 63, 400), (450, 150)):
        call(lens)
    if before is None:
        pytest.skip("this triton exposes no compile cache to count")
    assert n_compiled() == before


# ---------------------------------------------------------------------------------------------------------------------
# Hopper compile check without a GPU: the interpreter never runs the real compiler, so GPU-only compile errors would
# otherwise surface on the first GPU run. Compiles the kernels (softcap + dropout + padded head dim, the longest code
# path, causal; per-head and GQA-packed rows; the TMA forward at D=128) for sm_90 in a subprocess without
# TRITON_INTERPRET.
# ---------------------------------------------------------------------------------------------------------------------
_AOT = r"""
import llm2vec_fast.kernels.attention as A

ptrs = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
import triton.language as tl
todo = [("_attn_fwd_kernel", 128, 64, 8, 2, 80, True, False), ("_attn_fwd_kernel", 128, 64, 8, 2, 80, False, False),
        ("_attn_fwd_kernel", 128, 64, 8, 2, 80, True, True), ("_attn_bwd_dkdv_kernel", 32, 128, 8, 2, 80, True, False),
        ("_attn_bwd_dkdv_kernel", 32, 128, 8, 2, 80, True, True),
        ("_attn_bwd_dq_kernel", 128, 64, 8, 2, 80, True, False), ("_attn_bwd_dq_kernel", 128, 64, 8, 2, 80, True, True),
        # sentence-only tiles
        ("_attn_fwd_kernel", 64, 32, 4, 2, 80, False, True), ("_attn_bwd_dq_kernel", 64, 32, 4, 2, 80, True, True),
        # multi-sequence tiles, per-head and packed rows
        ("_attn_fwd_kernel", 128, 64, 8, 2, 80, True, "multi"),
        ("_attn_fwd_kernel", 128, 64, 8, 2, 80, False, "multi+"),
        ("_attn_bwd_dkdv_kernel", 64, 64, 8, 2, 80, True, "multi"),
        ("_attn_bwd_dkdv_kernel", 64, 64, 8, 2, 80, False, "multi+"),
        ("_attn_bwd_dq_kernel", 128, 64, 8, 2, 80, True, "multi+"),
        # a local window (HAS_WINDOW) on the pointer kernels, per-head and packed rows
        ("_attn_fwd_kernel", 128, 64, 8, 2, 80, False, "window"),
        ("_attn_bwd_dkdv_kernel", 32, 128, 8, 2, 80, False, "window"),
        ("_attn_bwd_dq_kernel", 128, 64, 8, 2, 80, True, "window")]
if hasattr(tl, "make_tensor_descriptor"):
    todo.append(("_attn_fwd_tma_kernel", 128, 64, 8, 2, 128, False, None))
for name, BM, BN, w, s, D, causal, pack in todo:
    fn = getattr(A, name).fn
    window = pack == "window"
    multi = isinstance(pack, str) and pack.startswith("multi")
    if window:
        pack = name != "_attn_fwd_kernel"
    elif multi:
        pack = pack == "multi+"
    consts = dict(D=D, BD=128, BM=BM, BN=BN, HAS_SOFTCAP=True, HAS_DROPOUT=True, CAUSAL=causal, HAS_WINDOW=window,
                  PREC="tf32")
    if pack is not None:
        consts["PACK"] = pack
    if name != "_attn_fwd_tma_kernel":
        consts["MULTI"] = multi
    sig = {}
    for n in fn.arg_names:
        sig[n] = ("constexpr" if n in consts else "*bf16" if n in ptrs else "*fp32" if n in ("LSE", "DELTA")
                  else "*i32" if n in ("CU", "ORDER", "SB") else "i64" if n == "seed"
                  else "fp32" if n in ("qk_mul", "cap_mul", "dropout_p", "drop_scale", "scale") else "i32")
    attrs = aligned(fn, sig)
    k = sm90(fn, sig, consts, attrs, num_warps=w, num_stages=s)
    assert "wgmma" in k.asm["ptx"], f"{name}: no Hopper tensor-core MMA in the PTX"
    print("OK", name, "causal" if causal else "", "packed" if pack else "", "window" if window else "",
          "multi" if multi else "")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    compile_for_hopper(_AOT, tmp_path, expected_ok=17)


def test_tile_order_favours_small_tiles_for_sentences(monkeypatch):
    """The autotuner's candidate tiles: the head dim's class, all of them unless LLM2VEC_FAST_AUTOTUNE limits the
    count, smallest first for sequences of at most 256 tokens (so a limited run still tries a 64-row tile there),
    the sentence-only tiles for those alone."""
    import triton

    for kind in ("fwd", "dkdv", "dq"):
        configs = [triton.Config({"BM": BM, "BN": BN}, num_warps=w, num_stages=s)
                   for c in attn._CLASSES for BM, BN, w, s, _ in attn._class_tiles(kind, c)]
        prune = attn._prune(kind)
        monkeypatch.delenv("LLM2VEC_FAST_AUTOTUNE", raising=False)
        for bd, cls in ((64, 64), (128, 128), (80, 128)):
            want = [(BM, BN) for BM, BN, _, _ in attn._TILES[kind][cls]]
            long = prune(configs, {}, BD=bd, SEQ_BUCKET=1024)
            assert [(c.kwargs["BM"], c.kwargs["BN"]) for c in long] == want
            short = [(c.kwargs["BM"], c.kwargs["BN"]) for c in prune(configs, {}, BD=bd, SEQ_BUCKET=256)]
            want = want + [(BM, BN) for BM, BN, _, _ in attn._SHORT_TILES[kind].get(cls, [])]
            assert sorted(short) == sorted(want) and [a * b for a, b in short] == sorted(a * b for a, b in want)
            # a small pack's bucket (+1) orders its tiles as its length bucket does
            for small, big in ((257, 256), (1025, 1024)):
                assert ([c.kwargs for c in prune(configs, {}, BD=bd, SEQ_BUCKET=small)]
                        == [c.kwargs for c in prune(configs, {}, BD=bd, SEQ_BUCKET=big)])
        monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "2")
        short = prune(configs, {}, BD=64, SEQ_BUCKET=256)
        assert len(short) == 2 and short[0].kwargs["BM"] * short[0].kwargs["BN"] == min(
            a * b for a, b, _, _, _ in attn._class_tiles(kind, 64))


def test_packed_layout_is_a_tuning_choice_only_where_heads_share_a_kv_head(monkeypatch):
    """The forward and both backward kernels offer each tile per head and GQA-packed: both when G > 1 (for long
    sequences the first two tiles per head, then packed, then the next two; for sentences the smallest tile packed
    first), per-head only when G = 1, the forced layout only under _FORCE_PACK."""
    import triton

    monkeypatch.delenv("LLM2VEC_FAST_AUTOTUNE", raising=False)
    for kind in ("fwd", "dkdv", "dq"):
        configs = [triton.Config({"BM": BM, "BN": BN, "PACK": p}, num_warps=w, num_stages=s)
                   for c in attn._CLASSES for BM, BN, w, s, _ in attn._class_tiles(kind, c) for p in (False, True)]
        prune = attn._prune(kind, pack=True)
        tiles = [(BM, BN) for BM, BN, _, _ in attn._TILES[kind][128]]
        with_short = tiles + [(BM, BN) for BM, BN, _, _ in attn._SHORT_TILES[kind].get(128, [])]

        def got(prune=prune, configs=configs, **kw):
            kept = prune(configs, {"G": kw.pop("G")}, BD=128, **kw)
            return [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["PACK"]) for c in kept]

        assert got(G=4, SEQ_BUCKET=1024) == [(*tiles[i], p) for pair in (0, 2) for p in (False, True)
                                             for i in (pair, pair + 1)]
        assert got(G=1, SEQ_BUCKET=1024) == [(a, b, False) for a, b in tiles]
        short = got(G=4, SEQ_BUCKET=257)
        assert sorted(short) == sorted((a, b, p) for a, b in with_short for p in (False, True))
        assert short[0][2] and short[0][0] * short[0][1] == min(a * b for a, b in with_short)
        monkeypatch.setattr(attn, "_FORCE_PACK", True)
        assert got(G=4, SEQ_BUCKET=1024) == got(G=1, SEQ_BUCKET=1024) == [(a, b, True) for a, b in tiles]
        assert got(G=4, SEQ_BUCKET=1024, PREC="ieee") == [(32, 32, True)]
        monkeypatch.setattr(attn, "_FORCE_PACK", None)
        assert got(G=4, SEQ_BUCKET=1024, PREC="ieee") == [(32, 32, False)]
        monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE", "1")
        assert got(G=4, SEQ_BUCKET=1024) == [(*tiles[0], False)]
        monkeypatch.delenv("LLM2VEC_FAST_AUTOTUNE")


def test_autotune_results_are_cached_on_disk_unless_opted_out(monkeypatch):
    import inspect

    import triton

    monkeypatch.delenv("LLM2VEC_FAST_AUTOTUNE_CACHE", raising=False)
    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert attn._autotune_kwargs() == ({"cache_results": True} if supported else {})
    monkeypatch.setenv("LLM2VEC_FAST_AUTOTUNE_CACHE", "0")
    assert attn._autotune_kwargs() == {}


def test_autotune_buckets_split_lengths_and_small_packs():
    assert [attn._seq_bucket(m, 65536) for m in (1, 256, 257, 1024, 1025, 8192)] == [256, 256, 1024, 1024, 8192, 8192]
    assert [attn._seq_bucket(m, attn.SMALL_PACK) for m in (100, 512, 4096)] == [257, 1025, 8193]
    assert attn._seq_bucket(100, attn.SMALL_PACK + 1) == 256
    # packs are bucketed by their work-weighted length ΣL²/ΣL (rounded up), not by their longest sequence
    assert attn._work_length([131] * 124 + [442]) == 140 and attn._work_length([100] * 80 + [8000]) == 4050
    assert attn._work_length([]) == attn._work_length([0, 0]) == 0 and attn._work_length([3, 4]) == 4
    cu = _cu([131] * 124 + [442])
    assert attn._seq_info(cu, int(cu[-1]), 442)[1] == 140
