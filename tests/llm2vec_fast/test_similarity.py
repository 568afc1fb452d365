"""LLM2Vec.similarity / similarity_pairwise against hand values and sentence-transformers' own functions."""
import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec

A = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
B = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]], dtype=np.float32)


def test_hand_values():
    torch.testing.assert_close(LLM2Vec.similarity(A, B), torch.tensor([[2**-0.5, 1.0, 0.0], [2**-0.5, 0.0, -1.0]]))
    torch.testing.assert_close(LLM2Vec.similarity(A, B, "dot"), torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, -2.0]]))
    torch.testing.assert_close(LLM2Vec.similarity(A, B, "manhattan"), -torch.tensor([[1.0, 2.0, 2.0],
                                                                                   [2.0, 5.0, 3.0]]))
    torch.testing.assert_close(LLM2Vec.similarity_pairwise(A, B[:2], "euclidean"), -torch.tensor([1.0, 13**0.5]))
    assert LLM2Vec.similarity(A[0], torch.from_numpy(B)).shape == (1, 3)


@pytest.mark.parametrize("fn", ["cosine", "dot", "euclidean", "manhattan"])
def test_same_as_sentence_transformers(fn):
    util = pytest.importorskip("sentence_transformers.util")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 17, generator=g), torch.randn(7, 17, generator=g)
    theirs = {"cosine": util.cos_sim, "dot": util.dot_score, "euclidean": util.euclidean_sim,
              "manhattan": util.manhattan_sim}[fn]
    pair = {"cosine": util.pairwise_cos_sim, "dot": util.pairwise_dot_score, "euclidean": util.pairwise_euclidean_sim,
            "manhattan": util.pairwise_manhattan_sim}[fn]
    torch.testing.assert_close(LLM2Vec.similarity(a, b, fn), theirs(a, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(LLM2Vec.similarity_pairwise(a, b[:5], fn), pair(a, b[:5]), atol=1e-5, rtol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="unknown similarity function 'cos'"):
        LLM2Vec.similarity(A, B, "cos")
    with pytest.raises(ValueError, match="different widths: 2 and 3"):
        LLM2Vec.similarity(A, np.ones((1, 3)))
    with pytest.raises(ValueError, match="equal shapes"):
        LLM2Vec.similarity_pairwise(A, B)
    with pytest.raises(TypeError, match="embeddings1 must be a tensor"):
        LLM2Vec.similarity("text", B)
