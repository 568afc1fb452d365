"""GradCache gives the gradients of plain in-batch training (tiny random Llama encoder with LoRA)."""
import pytest
import torch

from llm2vec_fast.training.gradcache import chunked, grad_cache_step, token_chunk_sizes
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


def _run(enc, items, sizes, chunk, loss_fn=None):
    def contrastive(reps):
        nq, np_ = sizes
        return hard_negative_nll_loss(reps[:nq], reps[nq:nq + np_], reps[nq + np_:], scale=50.0,
                                      mask_false_negatives=True)

    loss_fn = loss_fn or contrastive

    enc.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    if chunk is None:
        loss = loss_fn(enc(enc.tokenize(items)))
        loss.backward()
    else:
        loss = grad_cache_step(lambda ch: enc(enc.tokenize(ch)), loss_fn, items, chunk)
    return loss.detach(), _grads(enc)


@pytest.mark.parametrize("attn_dropout,lora_dropout,chunk",
                         [(0.0, 0.0, 5), (0.0, 0.0, 1), (0.3, 0.1, 100), (0.0, 0.0, [3, 1, 6, 2])],
                         ids=["no-dropout-chunk5", "no-dropout-chunk1", "dropout-one-chunk", "no-dropout-sizes"])
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


@pytest.mark.parametrize("loss", ["cosent", "angle", "cosine"])
def test_gradcache_equals_plain_for_scored_pairs(tiny_model_dir, loss):
    """The pair losses (CoSENT, AnglE, cosine MSE; Matryoshka on) under GradCache: the in-batch gradients."""
    from llm2vec_fast.training.losses import scored_pair_loss

    enc = _encoder(tiny_model_dir, 0.0, 0.0)
    items = sentences(6, seed=4) + sentences(6, seed=5)
    gold = torch.tensor([0.2, 0.9, 0.5, 0.5, 0.0, 0.7], dtype=torch.float64)

    def loss_fn(reps):
        return scored_pair_loss(reps[:6], reps[6:], gold, loss, matryoshka_dims=[64, 8])

    loss_plain, g_plain = _run(enc, items, None, None, loss_fn)
    loss_gc, g_gc = _run(enc, items, None, 5, loss_fn)
    torch.testing.assert_close(loss_gc, loss_plain, rtol=1e-10, atol=1e-10)
    assert g_plain.keys() == g_gc.keys() and len(g_plain) > 0
    for k in g_plain:
        assert g_plain[k].abs().max() > 0, k
        torch.testing.assert_close(g_gc[k], g_plain[k], rtol=1e-7, atol=1e-10, msg=k)


@pytest.mark.parametrize("keep_last", [True, False], ids=["kept-last-chunk", "every-chunk-twice"])
def test_gradcache_with_dropout_equals_chunked_in_batch(tiny_model_dir, monkeypatch, keep_last):
    """With attention and LoRA dropout and several chunks, GradCache's gradients equal those of one loss over the
    chunks encoded one after another with autograd (the same dropout draws, in the same order): the replayed chunks
    draw their masks again, the kept last chunk is encoded once. Encoder calls: 2 per chunk, 1 for the kept one."""
    import llm2vec_fast.training.gradcache as gc

    monkeypatch.setattr(gc, "KEEP_LAST_CHUNK", keep_last)
    enc = _encoder(tiny_model_dir, 0.3, 0.1)
    items = [["w1 ;", s] for s in sentences(3, seed=1)] + sentences(3, seed=2) + sentences(3, seed=3)

    def loss_fn(reps):
        return hard_negative_nll_loss(reps[:3], reps[3:6], reps[6:], scale=50.0)

    enc.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    reps = torch.cat([enc(enc.tokenize(ch)) for ch in chunked(items, 4)])
    loss_ref = loss_fn(reps)
    loss_ref.backward()
    g_ref = _grads(enc)

    calls = []
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss = grad_cache_step(lambda ch: calls.append(len(ch)) or enc(enc.tokenize(ch)), loss_fn, items, 4)
    assert calls == ([4, 4, 1, 4, 4] if keep_last else [4, 4, 1, 4, 4, 1])
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-10, atol=1e-10)
    g = _grads(enc)
    for k in g_ref:
        assert g_ref[k].abs().max() > 0, k
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-7, atol=1e-10, msg=k)


@pytest.mark.parametrize("n_items", [9, 4], ids=["three-chunks", "one-chunk"])
def test_gradcache_all_reduces_once(n_items):
    """Under DDP every forward and backward with autograd but the step's last runs inside no_sync (DDP decides at
    the forward whether the backward all-reduces), so gradients are all-reduced once per step."""
    import contextlib

    w = torch.nn.Parameter(torch.ones(3))
    state = {"in_no_sync": False}
    log = []

    @contextlib.contextmanager
    def no_sync():
        state["in_no_sync"] = True
        try:
            yield
        finally:
            state["in_no_sync"] = False

    def encode(ch):
        if torch.is_grad_enabled():
            log.append(("fwd", state["in_no_sync"]))
        return torch.stack([w * float(x) for x in ch])

    def backward(t):
        log.append(("bwd", state["in_no_sync"]))
        t.backward()

    grad_cache_step(encode, lambda r: (r ** 2).sum(), list(range(n_items)), 4, backward=backward, no_sync=no_sync)
    n_chunks = -(-n_items // 4)
    assert [k for k, _ in log].count("bwd") == n_chunks
    assert [s for _, s in log] == [True] * (2 * n_chunks - 2) + [False, False]
    torch.testing.assert_close(w.grad, 2 * w.detach() * sum(x * x for x in range(n_items)))


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


def test_chunk_sizes():
    assert chunked(list("abcdef"), [1, 3, 2]) == [["a"], ["b", "c", "d"], ["e", "f"]]
    for bad in ([1, 3], [0, 6], [2, 5]):
        with pytest.raises(ValueError, match="add up to the 6 items"):
            chunked(list("abcdef"), bad)
    # consecutive, at most the budget each; an item over the budget alone
    assert token_chunk_sizes([3, 4, 2, 9, 1, 1, 5], 8) == [2, 1, 1, 3]
    assert token_chunk_sizes([8, 8], 8) == [1, 1] and token_chunk_sizes([], 8) == []
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="token budget"):
            token_chunk_sizes([1], bad)


def test_trainer_chunks_by_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """gradcache_chunk_tokens: the batch is encoded in consecutive chunks of at most that many tokens; a run trains
    and saves; both chunk options at once, or a budget of 0, are refused."""
    import llm2vec_fast.training.contrastive as C

    sizes, forwards = [], []
    real_step, real_forward = C.grad_cache_step, C.ContrastiveModel.forward
    monkeypatch.setattr(C, "grad_cache_step", lambda **kw: sizes.append(kw["chunk_size"]) or real_step(**kw))
    monkeypatch.setattr(C.ContrastiveModel, "forward",
                        lambda self, f: forwards.append(f["input_ids"].numel()) or real_forward(self, f))
    f = tmp_path / "s.txt"
    f.write_text("\n".join(sentences(12, seed=4)) + "\n")
    args = C.ContrastiveArguments(mode="simcse", train_files=[str(f)], output_dir=str(tmp_path / "out"),
                                  model=tiny_model_dir, batch_size=6, max_steps=2, logging_steps=1, save_steps=0,
                                  disable_tqdm=True, max_length=32, gradcache_chunk_tokens=40)
    r = C.train_contrastive(args)
    assert r["steps_run"] == 2 and (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert len(sizes) == 2 and all(sum(s) == 12 and len(s) > 1 for s in sizes)  # both views of 6 sentences
    assert forwards and max(forwards) <= 40 and len(forwards) == sum(2 * len(s) - 1 for s in sizes)
    with pytest.raises(ValueError, match="not both"):
        C.ContrastiveArguments(mode="simcse", train_files=["x"], output_dir="o", gradcache_chunk_size=4,
                               gradcache_chunk_tokens=100)
    with pytest.raises(ValueError, match="gradcache_chunk_tokens must be an int >= 1"):
        C.ContrastiveArguments(mode="simcse", train_files=["x"], output_dir="o", gradcache_chunk_tokens=0)


def test_cli_gradcache_chunk_tokens(tiny_model_dir, tmp_path, capsys):
    import argparse
    import json

    from llm2vec_fast.training.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    f = tmp_path / "s.txt"
    f.write_text("\n".join(sentences(8, seed=6)) + "\n")
    a = parser.parse_args(["train", "simcse", "--model", tiny_model_dir, "--train-file", str(f), "--output-dir",
                           str(tmp_path / "out"), "--batch-size", "4", "--max-steps", "1", "--save-steps", "0",
                           "--no-progress", "--logging-steps", "1", "--gradcache-chunk-tokens", "30"])
    assert a.gradcache_chunk_tokens == 30 and a.func(a) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
