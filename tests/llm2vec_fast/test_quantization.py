"""Output precision and truncation helpers: hand-computed cases and parity with sentence-transformers."""
import numpy as np
import pytest
import torch

from llm2vec_fast.quantization import PRECISIONS, quantization_ranges, quantize_embeddings, truncate_embeddings


def test_float32_is_a_copy():
    emb = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = quantize_embeddings(emb, "float32")
    assert out.dtype == np.float32 and np.array_equal(out, emb)
    out[0, 0] = 99
    assert emb[0, 0] == 0


def test_uint8_int8_hand_computed():
    # dimension 0 spans [0, 255] -> step 1; dimension 1 is constant -> bucket 0
    emb = np.array([[0.0, 5.0], [255.0, 5.0], [100.7, 5.0]], dtype=np.float32)
    u = quantize_embeddings(emb, "uint8")
    assert u.dtype == np.uint8
    assert u.tolist() == [[0, 0], [255, 0], [100, 0]]
    i = quantize_embeddings(emb, "int8")
    assert i.dtype == np.int8
    assert i.tolist() == [[-128, -128], [127, -128], [-28, -128]]


def test_int8_calibration_and_ranges_agree_and_clip():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=(50, 7)).astype(np.float32)
    emb = rng.normal(size=(4, 7)).astype(np.float32) * 3  # wider than the calibration: clipped
    a = quantize_embeddings(emb, "int8", calibration_embeddings=cal)
    b = quantize_embeddings(emb, "int8", ranges=quantization_ranges(cal))
    assert np.array_equal(a, b)
    assert a.min() >= -128 and a.max() <= 127
    assert (a == -128).any() and (a == 127).any()


def test_binary_packs_sign_bits_big_endian():
    emb = np.array([[1, -1, 0, 2, -3, 4, 5, -6, 7, 0.5], [-1] * 10], dtype=np.float32)
    ub = quantize_embeddings(emb, "ubinary")
    # bits 1,0,0,1,0,1,1,0 | 1,1 (padded with zeros)
    assert ub.dtype == np.uint8 and ub.shape == (2, 2)
    assert ub.tolist() == [[0b10010110, 0b11000000], [0, 0]]
    b = quantize_embeddings(emb, "binary")
    assert b.dtype == np.int8
    assert b.tolist() == [[0b10010110 - 128, 0b11000000 - 128], [-128, -128]]


def test_torch_input_accepted():
    emb = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])
    assert quantize_embeddings(emb, "ubinary").tolist() == [[0b10000000], [0b01000000]]


@pytest.mark.parametrize("precision", [p for p in PRECISIONS])
def test_matches_sentence_transformers(precision):
    st_quant = pytest.importorskip("sentence_transformers.util.quantization")
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(130, 45)).astype(np.float32)
    cal = rng.normal(size=(200, 45)).astype(np.float32)
    ours = quantize_embeddings(emb, precision, calibration_embeddings=cal)
    theirs = st_quant.quantize_embeddings(emb, precision=precision, calibration_embeddings=cal)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(precision="fp16"), "unknown precision 'fp16'"),
        (dict(precision="int8", ranges=np.zeros((2, 3))), r"ranges must have shape \(2, 4\)"),
        (dict(precision="int8", calibration_embeddings=np.zeros((5, 3))), r"shape \[M, 4\]"),
    ],
    ids=["bad-name", "bad-ranges", "bad-calibration"],
)
def test_quantize_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_embeddings(np.ones((3, 4), dtype=np.float32), **kwargs)


def test_int8_needs_two_rows_or_calibration():
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        quantize_embeddings(np.ones((1, 4), dtype=np.float32), "int8")
    out = quantize_embeddings(np.ones(4, dtype=np.float32), "uint8", ranges=np.array([[0.0] * 4, [2.0] * 4]))
    assert out.tolist() == [127] * 4


def test_integer_input_rejected():
    with pytest.raises(ValueError, match="floating point"):
        quantize_embeddings(np.ones((3, 4), dtype=np.int8), "binary")


def test_truncate_numpy_and_torch():
    emb = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    t = truncate_embeddings(emb, 2)
    assert t.shape == (2, 2) and np.array_equal(t, emb[:, :2])
    r = truncate_embeddings(emb, 2, renormalize=True)
    np.testing.assert_allclose(r, [[0.6, 0.8], [0.0, 0.0]])  # the zero row stays zero, no NaN
    tt = truncate_embeddings(torch.from_numpy(emb), 2, renormalize=True)
    assert isinstance(tt, torch.Tensor)
    np.testing.assert_allclose(tt.numpy(), [[0.6, 0.8], [0.0, 0.0]])
    assert truncate_embeddings(emb, None) is emb
    np.testing.assert_allclose(np.linalg.norm(truncate_embeddings(emb, None, True)[0]), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dim", [0, -1, 4], ids=["zero", "negative", "wider"])
def test_truncate_out_of_range(dim):
    with pytest.raises(ValueError, match=f"truncate_dim={dim} is out of range.*<= 3"):
        truncate_embeddings(np.ones((2, 3), dtype=np.float32), dim)


def test_truncate_bad_type():
    with pytest.raises(TypeError, match="truncate_dim must be an int"):
        truncate_embeddings(np.ones((2, 3), dtype=np.float32), 2.5)


def test_review_quantization_edges():
    """float64 input buckets as sentence-transformers does; token-embedding lists share one set of buckets; integer
    embeddings are refused by similarity (their byte values are no embedding)."""
    from llm2vec_fast.quantization import quantize_embeddings
    from llm2vec_fast.similarity import similarity

    x = np.random.default_rng(0).standard_normal((1000, 37))
    st = pytest.importorskip("sentence_transformers.quantization")
    for precision in ("int8", "uint8"):
        assert np.array_equal(quantize_embeddings(x, precision), st.quantize_embeddings(x, precision))
    parts = quantize_embeddings([x[:3], x[3:10]], "int8")
    assert [p.shape for p in parts] == [(3, 37), (7, 37)]
    assert np.array_equal(np.concatenate(parts), quantize_embeddings(x[:10], "int8"))
    with pytest.raises(TypeError, match="integer dtype torch.int8: quantized or packed binary embeddings"):
        similarity(quantize_embeddings(x[:4], "binary"), quantize_embeddings(x[4:8], "binary"))
