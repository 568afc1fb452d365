"""GradCache gives the gradients of plain in-batch training (tiny random Llama encoder with LoRA)."""
import pytest
import torch

from llm2vec_fast.training.gradcache import chunked, grad_cache_step
from llm2vec_fast.training.losses import hard_negative_nll_loss

from .conftest import sentences


def _encoder(model_dir, attn_dropout, lora_dropout):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.bidirectional import set_attention_dropout
    from llm2vec_fast.training.common import add_lora

    enc = LLM2Vec.from_pretrained(model_dir, device="cpu", dtype=torch.float64)
    set_attention_dropout(enc.model, attn_dropout)
    enc.model = add_lora(enc.model, dropout=lora_dropout)
    torch.manual_seed(0)
    for n, p in enc.model.named_parameters():
        if "lora_B" in n:  # fresh LoRA has B = 0 (no gradient to A): make every LoRA weight matter
            p.data.normal_(0, 0.05)
    enc.train()
    return enc


def _grads(enc):
    return {n: p.grad.clone() for n, p in enc.model.named_parameters() if p.requires_grad}


def _run(enc, items, sizes, chunk):
    def loss_fn(reps):
        nq, np_ = sizes
        return hard_negative_nll_loss(reps[:nq], reps[nq:nq + np_], reps[nq + np_:], scale=50.0,
                                      mask_false_negatives=True)

    enc.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    if chunk is None:
        loss = loss_fn(enc(enc.tokenize(items)))
        loss.backward()
    else:
        loss = grad_cache_step(lambda ch: enc(enc.tokenize(ch)), loss_fn, items, chunk)
    return loss.detach(), _grads(enc)


@pytest.mark.parametrize("attn_dropout,lora_dropout,chunk", [(0.0, 0.0, 5), (0.0, 0.0, 1), (0.3, 0.1, 100)],
                         ids=["no-dropout-chunk5", "no-dropout-chunk1", "dropout-one-chunk-replays-rng"])
def test_gradcache_equals_plain_in_batch(tiny_model_dir, attn_dropout, lora_dropout, chunk):
    enc = _encoder(tiny_model_dir, attn_dropout, lora_dropout)
    q = [["w1 ;", s] for s in sentences(4, seed=1)]  # queries carry an instruction
    p, n = sentences(4, seed=2), sentences(4, seed=3)
    items = q + p + n
    loss_plain, g_plain = _run(enc, items, (4, 4), None)
    loss_gc, g_gc = _run(enc, items, (4, 4), chunk)
    torch.testing.assert_close(loss_gc, loss_plain, rtol=1e-10, atol=1e-10)
    assert g_plain.keys() == g_gc.keys() and len(g_plain) > 0
    for k in g_plain:
        assert g_plain[k].abs().max() > 0, k
        torch.testing.assert_close(g_gc[k], g_plain[k], rtol=1e-7, atol=1e-10, msg=k)


def test_dropout_is_active_and_replayed(tiny_model_dir):
    """With dropout, two plain forwards differ (so the replay in the test above is doing real work)."""
    enc = _encoder(tiny_model_dir, 0.3, 0.0)
    feats = enc.tokenize(sentences(3, seed=5))
    with torch.no_grad():
        a, b = enc(feats), enc(feats)
        assert (a - b).abs().max() > 1e-4
        enc.eval()
        torch.testing.assert_close(enc(feats), enc(feats))


def test_chunked_rejects_bad_size():
    assert chunked([1, 2, 3], 2) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="chunk size"):
        chunked([1], 0)
