"""LLM2Vec encoder: conformance with the original llm2vec 0.2.3, batch invariance, pooling, save/load, PEFT, errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec, to_bidirectional
from llm2vec_fast.encoder import pack


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def tiny(tiny_encoder_dir):
    return LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------- conformance with the original library
@pytest.fixture(scope="module")
def default_bidirectional(default_model_dir):
    return LLM2Vec.from_pretrained(device="cpu", dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "eos_token", "mean_causal"])
def test_conformance_with_llm2vec_0_2_3(mode, shared_dir, default_bidirectional):
    inputs = json.loads((shared_dir / "conformance" / "inputs.json").read_text())
    ref = np.load(shared_dir / "conformance" / "llm2vec-0.2.3-smollm2-135m.npz")[mode]
    if mode == "mean_causal":
        model = LLM2Vec.from_pretrained(enable_bidirectional=False, device="cpu", dtype=torch.float32)
        # causal, but through the packed per-sequence path rather than HF's [T, T] block mask
        assert model.model.config._attn_implementation == "llm2vec_fast_causal"
    else:
        model = default_bidirectional
        model.pooling_mode = mode
    emb = model.encode(inputs, batch_size=8, show_progress_bar=False, convert_to_numpy=True)
    default_bidirectional.pooling_mode = "mean"
    cos = _cos(emb, ref)
    assert cos.min() >= 0.99999, f"worst rows {np.argsort(cos)[:5].tolist()}: {np.sort(cos)[:5].tolist()}"


@pytest.mark.slow
def test_batch_invariance_default_model(default_bidirectional, data_dir):
    lines = (data_dir / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:12]
    texts = [ln.split("\t")[5] for ln in lines]
    items = texts[:8] + [["Retrieve semantically similar text", t] for t in texts[8:]]
    model = default_bidirectional
    base = model.encode(items, batch_size=1, max_batch_tokens=1, show_progress_bar=False)
    for kw in (dict(batch_size=32), dict(batch_size=5), dict(max_batch_tokens=64)):
        other = model.encode(items, show_progress_bar=False, **kw)
        assert (other - base).abs().max() <= 1e-5, kw
    # a text's embedding does not depend on its neighbours
    alone = model.encode(items[3], show_progress_bar=False)
    assert (alone - base[3]).abs().max() <= 1e-5


# ---------------------------------------------------------------- pooling semantics, independently computed
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "eos_token", "last_token", "bos_token"])
def test_pooling_modes_match_padded_forward(tiny, mode):
    tiny.pooling_mode = mode
    items = ["A man is playing a flute.", ["Retrieve similar text", "A cat sleeps."], "Hi"]
    emb = tiny.encode(items, show_progress_bar=False)
    tok = tiny.tokenizer
    for i, item in enumerate(items):
        instr, text = (item if isinstance(item, list) else ["", item])
        joint = f"{instr.strip()} {text}" if instr else text
        if mode == "eos_token":
            joint, text = joint.strip() + " </s>", text.strip() + " </s>"
        ids = torch.tensor([tok(joint)["input_ids"]])
        with torch.no_grad():
            h = tiny.model(input_ids=ids).last_hidden_state[0]
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        span = h[-n:]
        expected = {"mean": span.mean(0),
                    "weighted_mean": (span * torch.arange(1, n + 1)[:, None]).sum(0) / (n * (n + 1) / 2),
                    "eos_token": h[-1], "last_token": h[-1], "bos_token": h[0]}[mode]
        torch.testing.assert_close(emb[i], expected, rtol=1e-5, atol=1e-5)
    tiny.pooling_mode = "mean"


def test_skip_instruction_off_pools_everything(tiny_encoder_dir):
    on = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    off = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, skip_instruction=False)
    item = ["Represent this", "A cat sleeps."]
    assert on.tokenize([item])["pool_start"].item() > 0
    assert off.tokenize([item])["pool_start"].item() == 0
    joint = on.encode(["Represent this A cat sleeps."], show_progress_bar=False)
    torch.testing.assert_close(off.encode([item], show_progress_bar=False), joint, rtol=1e-5, atol=1e-5)


def test_tokenize_packs_without_padding(tiny):
    f = tiny.tokenize(["one two three", ["instr", "four"], "five"])
    lengths = (f["cu_seqlens"][1:] - f["cu_seqlens"][:-1]).tolist()
    assert f["input_ids"].numel() == sum(lengths) and f["cu_seqlens"].dtype == torch.int32
    assert f["position_ids"].tolist()[: lengths[0]] == list(range(lengths[0]))
    assert f["max_seqlen"] == max(lengths)
    assert f["pool_start"].tolist()[0] == 0 and f["pool_start"].tolist()[1] > 0


def test_forward_is_differentiable(tiny):
    f = tiny.tokenize(["a b c", "d e"])
    tiny.model.train()
    emb = tiny(f)
    emb.sum().backward()
    grads = [p.grad for p in tiny.model.parameters() if p.grad is not None]
    tiny.model.zero_grad()
    tiny.model.eval()
    assert emb.shape == (2, tiny.model.config.hidden_size) and grads


# ---------------------------------------------------------------- inputs and outputs
def test_output_forms_and_order(tiny):
    items = ["short", "a much longer sentence than the others in this list", "mid length text"]
    t = tiny.encode(items, show_progress_bar=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (3, 64)
    n = tiny.encode(items, convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(n, np.ndarray) and np.allclose(n, t.numpy())
    one = tiny.encode("short", show_progress_bar=False)
    assert one.shape == (64,) and torch.allclose(one, t[0], atol=1e-6)
    normed = tiny.encode(items, normalize_embeddings=True, show_progress_bar=False)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(3))
    rev = tiny.encode(items[::-1], show_progress_bar=False)
    torch.testing.assert_close(rev, t.flip(0), rtol=1e-5, atol=1e-5)


def test_chunked_tokenization_matches_one_chunk(tiny, monkeypatch):
    """Tokenizing in background chunks (a large input) gives the same rows, in input order, as one chunk."""
    import llm2vec_fast.encoder as enc

    items = [f"sentence number {i} " + "word " * (i % 7) for i in range(23)]
    items[5], items[17] = "   ", ["an instruction", "instructed text"]
    whole = tiny.encode(items, batch_size=3, show_progress_bar=False)
    calls = []
    real = tiny.tokenize_items
    monkeypatch.setattr(tiny, "tokenize_items", lambda pairs: calls.append(len(pairs)) or real(pairs))
    monkeypatch.setattr(enc, "_TOKENIZE_CHUNK", 4)
    chunked = tiny.encode(items, batch_size=3, show_progress_bar=False)
    assert calls == [4, 4, 4, 4, 4, 2]  # 22 non-empty texts in chunks of 4
    assert (chunked - whole).abs().max() <= 1e-6
    assert (chunked[5] == 0).all()
    # growing chunks: 1, 2, 4, 8, then the rest
    calls.clear()
    monkeypatch.setattr(enc, "_FIRST_CHUNK", 1)
    monkeypatch.setattr(enc, "_TOKENIZE_CHUNK", 8)
    grown = tiny.encode(items, batch_size=3, show_progress_bar=False)
    assert calls == [1, 2, 4, 8, 7]
    assert (grown - whole).abs().max() <= 1e-6


@pytest.mark.parametrize("early", [True, False])
def test_chunk_leftovers_join_the_next_chunk(tiny, monkeypatch, early):
    """A chunk's partly filled last batch waits for the next chunk, so only the call's last batch is short; except
    (``_EARLY_PARTIAL``) a growing chunk that fills no whole batch, which runs at once: here the first, 3 texts."""
    import llm2vec_fast.encoder as enc

    items = [f"text {i} " + "word " * (i % 5) for i in range(40)]
    whole = tiny.encode(items, max_batch_tokens=64, show_progress_bar=False)
    sizes = []
    real = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda f: sizes.append(f["input_ids"].numel()) or real(f))
    monkeypatch.setattr(enc, "_FIRST_CHUNK", 3)
    monkeypatch.setattr(enc, "_TOKENIZE_CHUNK", 6)
    monkeypatch.setattr(enc, "_EARLY_PARTIAL", early)
    chunked = tiny.encode(items, max_batch_tokens=64, show_progress_bar=False)
    lengths = [len(tiny.tokenize([t])["input_ids"]) for t in items]
    assert len(sizes) >= 3
    if early:
        assert sizes[0] == sum(lengths[:3]), sizes  # the first chunk alone, before the next is tokenized
        sizes = sizes[1:]
    assert all(n > 64 - max(lengths) for n in sizes[:-1]), sizes  # full to within one text, but the last
    assert sum(sizes) == sum(lengths) - (sum(lengths[:3]) if early else 0)
    assert (chunked - whole).abs().max() <= 1e-6


def test_background_errors_reach_the_caller(tiny, monkeypatch):
    import llm2vec_fast.encoder as enc

    monkeypatch.setattr(enc, "_TOKENIZE_CHUNK", 2)
    real = tiny.tokenize_items

    def flaky(pairs):
        if any(t == "boom" for _, t in pairs):
            raise RuntimeError("tokenizer failed on chunk with 'boom'")
        return real(pairs)

    monkeypatch.setattr(tiny, "tokenize_items", flaky)
    with pytest.raises(RuntimeError, match="chunk with 'boom'"):
        tiny.encode(["a", "b", "c", "d", "boom", "e"], show_progress_bar=False)


def test_empty_and_whitespace_inputs(tiny):
    assert tiny.encode([], show_progress_bar=False).shape == (0, 64)
    assert tiny.encode([], convert_to_numpy=True, show_progress_bar=False).shape == (0, 64)
    out = tiny.encode(["", "   ", "real text", ["instr", ""]], show_progress_bar=False)
    assert torch.isfinite(out).all()
    assert (out[[0, 1, 3]] == 0).all() and out[2].abs().sum() > 0


@pytest.mark.parametrize("bad, err, match", [
    ([None], TypeError, r"item 0 .* got NoneType"),
    (["ok", 3], TypeError, r"item 1 .* got int"),
    ([["only one"]], ValueError, r"item 0 must be .* pair"),
    ([["a", "b", "c"]], ValueError, r"item 0 must be .* pair"),
    ([["a", 5]], ValueError, r"item 0 must be"),
    (42, TypeError, "sentences must be a string or a list"),
])
def test_bad_inputs(tiny, bad, err, match):
    with pytest.raises(err, match=match):
        tiny.encode(bad, show_progress_bar=False)


def test_bad_arguments(tiny, tiny_encoder_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown pooling mode 'max'"):
        LLM2Vec.from_pretrained(str(tiny_encoder_dir), pooling_mode="max")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        tiny.encode(["x"], batch_size=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM2Vec.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM2Vec.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        LLM2Vec.from_pretrained(str(tiny_encoder_dir), dtype="fp8")


def test_unknown_family(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'gpt2' is not supported.*enable_bidirectional=False"):
        LLM2Vec.from_pretrained(str(tmp_path))
    causal = LLM2Vec.from_pretrained(str(tmp_path), enable_bidirectional=False, device="cpu")
    assert causal.encode(["works causally"], show_progress_bar=False).shape == (1, 32)


def test_long_texts_are_truncated(tiny_encoder_dir):
    model = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, max_length=32,
                                    doc_max_length=20)
    long = " ".join(["word"] * 500)
    f = model.tokenize([long, ["an instruction here", long]])
    lengths = (f["cu_seqlens"][1:] - f["cu_seqlens"][:-1]).tolist()
    assert max(lengths) <= 32
    # doc_max_length shortened the text word-wise: at most 20 text tokens are pooled
    assert (torch.tensor(lengths) - f["pool_start"]).max() <= 20
    assert torch.isfinite(model.encode([long], show_progress_bar=False)).all()


@pytest.mark.parametrize("text", ["日本語のテキスト" * 30, "x" * 3000, "-".join(["tok"] * 600),
                                  "https://example.com/" + "a1b2c3" * 200])
def test_long_text_without_spaces_is_cut_by_tokens_not_emptied(tiny_encoder_dir, text):
    # the original's word-wise rule would keep int(1 word × 20 / n) = 0 words of it: an empty pooled span
    model = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, max_length=32,
                                    doc_max_length=20)
    f = model.tokenize([text, ["an instruction", text]])
    pooled = (f["cu_seqlens"][1:] - f["cu_seqlens"][:-1]) - f["pool_start"]
    assert 15 <= pooled.min() and pooled.max() <= 20
    shortened = model._shorten(text)
    assert text.startswith(shortened) and shortened.strip()
    assert (model.encode([text], show_progress_bar=False).norm(dim=-1) > 0).all()


@pytest.mark.parametrize("precision,width", [("float32", 64), ("int8", 64), ("binary", 8), ("ubinary", 8)])
def test_empty_input_in_every_precision(tiny, precision, width):
    assert tiny.encode([], precision=precision, show_progress_bar=False).shape == (0, width)


def test_encode_corpus_null_title_or_text(tiny):
    got = tiny.encode_corpus([{"title": None, "text": "x"}, {"title": "T", "text": None}], show_progress_bar=False)
    torch.testing.assert_close(got, tiny.encode(["x", "T"], show_progress_bar=False))
    # strings and documents mixed; a document that is not BEIR-shaped is refused, naming its index
    mixed = tiny.encode_corpus([{"title": "T", "text": "body"}, "plain"], show_progress_bar=False)
    torch.testing.assert_close(mixed, tiny.encode(["T body", "plain"], show_progress_bar=False))
    with pytest.raises(ValueError, match=r"corpus\[0\] has neither 'text' nor 'title' \(keys: \['content'\]\)"):
        tiny.encode_corpus([{"content": "body"}], show_progress_bar=False)
    with pytest.raises(TypeError, match=r"corpus\[1\] must be a string or a \{'title', 'text'\} dict, got int"):
        tiny.encode_corpus([{"text": "a"}, 3], show_progress_bar=False)
    with pytest.raises(TypeError, match=r"corpus\[0\]: 'title' and 'text' must be strings, got list"):
        tiny.encode_corpus([{"text": ["a"]}], show_progress_bar=False)


def test_an_instruction_that_fills_max_length_is_reported(tiny_encoder_dir, caplog):
    model = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, max_length=16)
    with caplog.at_level("WARNING", logger="llm2vec_fast.encoder"):
        model.encode([["short", "a text"]], show_progress_bar=False)
    assert "fills max_length" not in caplog.text
    with caplog.at_level("WARNING", logger="llm2vec_fast.encoder"):
        model.encode([["short", "a text"], [" ".join(["instruction"] * 40), "The cat sat."]],
                     show_progress_bar=False)
    assert "1 input(s) (first: 1) have an instruction that fills max_length=16" in caplog.text


def test_bad_truncate_dim_is_refused_before_encoding(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(type(tiny), "_encode", lambda *a, **k: calls.append(1))
    for bad in (0, 100_000):
        with pytest.raises(ValueError, match=f"truncate_dim={bad} is out of range"):
            tiny.encode(["a text"], truncate_dim=bad, show_progress_bar=False)
    assert calls == []


def test_tuple_of_strings_is_a_sequence_of_texts(tiny):
    # as the original and sentence-transformers read it; a single pair is [[instruction, text]]
    two = tiny.encode(("first text", "second text"), show_progress_bar=False)
    torch.testing.assert_close(two, tiny.encode(["first text", "second text"], show_progress_bar=False))
    assert tiny.encode([("an instruction", "a text")], show_progress_bar=False).shape[0] == 1


# ---------------------------------------------------------------- save / load, PEFT
def test_save_and_reload(tiny, tmp_path):
    tiny.pooling_mode = "weighted_mean"
    items = ["a sentence", ["instr", "another one"]]
    before = tiny.encode(items, show_progress_bar=False)
    tiny.save(tmp_path / "saved")
    tiny.pooling_mode = "mean"
    cfg = json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())
    # the original's four keys only (its loader passes each to its constructor); ours beside them
    assert set(cfg) == {"pooling_mode", "max_length", "doc_max_length", "skip_instruction"}
    assert cfg["pooling_mode"] == "weighted_mean"
    assert json.loads((tmp_path / "saved" / "llm2vec_fast_config.json").read_text())["bidirectional"] is True
    again = LLM2Vec.from_pretrained(str(tmp_path / "saved"), device="cpu", dtype=torch.float32)
    assert again.pooling_mode == "weighted_mean"
    torch.testing.assert_close(again.encode(items, show_progress_bar=False), before, rtol=1e-5, atol=1e-6)


def test_peft_adapter_load_and_merge(tiny_encoder_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    base = AutoModel.from_pretrained(tiny_encoder_dir)
    to_bidirectional(base)
    torch.manual_seed(1)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    expected = LLM2Vec(peft.eval(), tok).encode(["text one", "two"], show_progress_bar=False)
    from llm2vec_fast.lora import is_lora_fused

    for merge in (False, True):
        l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), peft_model_name_or_path=str(tmp_path / "adapter"),
                                      merge_peft=merge, device="cpu", dtype=torch.float32)
        assert is_lora_fused(l2v.model) == (not merge)  # an unmerged adapter runs the fused LoRA layers
        torch.testing.assert_close(l2v.encode(["text one", "two"], show_progress_bar=False), expected,
                                   rtol=1e-5, atol=1e-5)
    # the original MNTP release layout: the base folder itself carries the adapter; it is merged on load
    import shutil

    release = tmp_path / "release"
    shutil.copytree(tiny_encoder_dir, release)
    for f in (tmp_path / "adapter").iterdir():
        shutil.copy(f, release / f.name)
    l2v = LLM2Vec.from_pretrained(str(release), device="cpu", dtype=torch.float32)
    assert not any("lora" in n for n, _ in l2v.model.named_parameters())
    torch.testing.assert_close(l2v.encode(["text one", "two"], show_progress_bar=False), expected,
                               rtol=1e-5, atol=1e-5)


def test_chat_template_choice_survives_save_and_reload(tiny, tmp_path):
    """The original wraps texts in a chat template picked by the hub name; a reloaded folder's name is its path,
    so the name is kept in llm2vec_config.json."""
    name = tiny.model.config._name_or_path
    try:
        tiny.model.config._name_or_path = "Qwen/Qwen2-1.5B-Instruct"
        assert tiny.prepare_for_tokenization("hello") == "<|im_start|>user\nhello<|im_end|>"
        items = ["plain text", ["An instruction", "instructed text"]]
        before = tiny.encode(items, show_progress_bar=False)
        tiny.save(tmp_path / "qwen")
    finally:
        tiny.model.config._name_or_path = name
    again = LLM2Vec.from_pretrained(str(tmp_path / "qwen"), device="cpu", dtype=torch.float32)
    assert again.template_name == "Qwen/Qwen2-1.5B-Instruct"
    assert again.prepare_for_tokenization("hello") == "<|im_start|>user\nhello<|im_end|>"
    torch.testing.assert_close(again.encode(items, show_progress_bar=False), before, rtol=1e-5, atol=1e-5)
    tiny.save(tmp_path / "plain")  # no template: nothing recorded
    assert "template_name" not in json.loads((tmp_path / "plain" / "llm2vec_fast_config.json").read_text())


def test_saving_into_a_release_folder_leaves_its_linked_base_alone(tiny_encoder_dir, tmp_path):
    """An MNTP release folder hard-links the base's config and weights: saving an encoder into it must replace
    those names, not write through them, and must not leave the adapter beside the merged weights (it would be
    merged a second time on load)."""
    import hashlib
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from llm2vec_fast.training.mntp import link_base_files

    def digest(folder):
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}

    base_dir = tmp_path / "base"
    shutil.copytree(tiny_encoder_dir, base_dir)
    before = digest(base_dir)
    torch.manual_seed(3)
    peft = get_peft_model(AutoModel.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                          target_modules=["q_proj", "up_proj"]))
    release = tmp_path / "release"
    peft.save_pretrained(release)
    link_base_files(str(base_dir), release)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, release / name)
    assert (release / "model.safetensors").stat().st_nlink == 2
    l2v = LLM2Vec.from_pretrained(str(release), device="cpu", dtype=torch.float32)
    expected = l2v.encode(["text one", "two"], show_progress_bar=False)
    l2v.save(str(release))
    assert digest(base_dir) == before  # the base model is untouched
    assert not (release / "adapter_config.json").exists() and not list(release.glob(".saving-*"))
    again = LLM2Vec.from_pretrained(str(release), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(again.encode(["text one", "two"], show_progress_bar=False), expected,
                               rtol=1e-5, atol=1e-5)


def test_pack_helper():
    f = pack([np.array([5, 6, 7], np.int32), np.array([8], np.int32)], np.array([1, 0], np.int32))
    assert f["cu_seqlens"].tolist() == [0, 3, 4] and f["position_ids"].tolist() == [0, 1, 2, 0]
    assert f["input_ids"].dtype == torch.int64 and f["pool_start"].tolist() == [1, 0]


def test_prompts_precision_truncation(tiny_encoder_dir, tmp_path):
    l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    l2v.prompts = {"query": "Retrieve passages", "document": ""}
    q = l2v.encode_queries(["what is x"], show_progress_bar=False)
    torch.testing.assert_close(q, l2v.encode([["Retrieve passages", "what is x"]], show_progress_bar=False))
    docs = l2v.encode_corpus([{"title": "T", "text": "body"}], show_progress_bar=False)
    torch.testing.assert_close(docs, l2v.encode(["T body"], show_progress_bar=False))
    l2v.save(tmp_path / "p")
    assert LLM2Vec.from_pretrained(str(tmp_path / "p"), device="cpu").prompts["query"] == "Retrieve passages"
    with pytest.raises(ValueError, match="unknown prompt name 'passage'"):
        l2v.encode(["x"], prompt_name="passage")
    bits = l2v.encode(["a", "b"], precision="binary", show_progress_bar=False)
    assert bits.dtype == np.int8 and bits.shape == (2, 8)
    small = l2v.encode(["a", "b"], truncate_dim=10, normalize_embeddings=True, show_progress_bar=False)
    torch.testing.assert_close(small.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        l2v.encode(["a"], precision="int4")


def test_default_batch_tokens_per_device():
    from types import SimpleNamespace

    from llm2vec_fast.encoder import default_batch_tokens

    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=14336)  # a 7B Mistral
    assert default_batch_tokens(cfg, "cpu", 512) == 32 * 512
    per_token = 2 * 2 * (6 * 4096 + 3 * 14336)  # bf16, doubled
    assert default_batch_tokens(cfg, "cuda", 512, free_bytes=60 * 2**30) == 65536  # an H100 after the weights: cap
    small = default_batch_tokens(cfg, "cuda", 512, free_bytes=2 * 2**30)  # a small card
    assert small == (2 * 2**30 // 2 // per_token) // 1024 * 1024 and 512 <= small < 65536
    assert default_batch_tokens(cfg, "cuda", 512, free_bytes=10**6) == 512  # one full-length text always fits
    fp32 = default_batch_tokens(cfg, "cuda", 512, free_bytes=2 * 2**30, dtype=torch.float32)
    assert fp32 < small


def test_default_batch_tokens_counts_memory_the_allocator_caches(monkeypatch):
    """A second encode in one process sees the first one's freed activations held by PyTorch's caching allocator:
    they count as free, so the budget does not shrink from call to call."""
    from types import SimpleNamespace

    from llm2vec_fast.encoder import default_batch_tokens

    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=14336)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 1 * 2**30)
    assert default_batch_tokens(cfg, "cuda:0", 512) == default_batch_tokens(cfg, "cuda", 512, free_bytes=4 * 2**30)


def test_causal_encode_packed_equals_hf_causal(tiny_encoder_dir):
    """enable_bidirectional=False runs the packed per-sequence causal path; an explicit attn_implementation keeps
    Hugging Face's own, and both give the same embeddings."""
    items = ["A man is playing a flute.", ["Retrieve similar text", "A cat sleeps."], "Hi", "word " * 40]
    ours = LLM2Vec.from_pretrained(str(tiny_encoder_dir), enable_bidirectional=False, device="cpu",
                                   dtype=torch.float32)
    hf = LLM2Vec.from_pretrained(str(tiny_encoder_dir), enable_bidirectional=False, device="cpu",
                                 dtype=torch.float32, attn_implementation="sdpa")
    assert ours.model.config._attn_implementation == "llm2vec_fast_causal"
    assert hf.model.config._attn_implementation == "sdpa"
    a, b = (m.encode(items, show_progress_bar=False) for m in (ours, hf))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_encode_to_disk_int8_uses_one_set_of_ranges(tiny, tmp_path):
    from llm2vec_fast.quantization import quantization_ranges, quantize_embeddings

    texts = [f"text number {i} " + "x " * (i % 5) for i in range(10)]
    manifest = tiny.encode_to_disk(texts, tmp_path, chunk_size=4, precision="int8", show_progress_bar=False)
    got = np.concatenate([np.load(tmp_path / s["file"]) for s in manifest["shards"]])
    full = tiny.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    ranges = quantization_ranges(full[:4])  # the first shard's rows calibrate every shard
    assert got.dtype == np.int8 and manifest["precision"] == "int8"
    np.testing.assert_allclose(np.asarray(manifest["quantization_ranges"]), ranges, rtol=1e-6)
    assert np.abs(got.astype(int) - quantize_embeddings(full, "int8", ranges=ranges).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="other settings \\(precision: 'int8', now 'float32'\\)"):
        tiny.encode_to_disk(texts, tmp_path, chunk_size=4, show_progress_bar=False)


def test_encode_to_disk_never_mixes_in_other_inputs_or_settings(tiny, tmp_path):
    abc, xyz = ["alpha text", "beta text", "gamma text"], ["x one", "y two", "z three"]
    first = tiny.encode_to_disk(abc, tmp_path, chunk_size=2, show_progress_bar=False)
    assert [len(sh["sha1"]) for sh in first["shards"]] == [40, 40]
    with pytest.raises(ValueError, match="embeddings-00000.npy holds the embeddings of other inputs"):
        tiny.encode_to_disk(xyz, tmp_path, chunk_size=2, show_progress_bar=False)
    with pytest.raises(ValueError, match="other settings \\(truncate_dim: None, now 8\\)"):
        tiny.encode_to_disk(abc, tmp_path, chunk_size=2, truncate_dim=8, show_progress_bar=False)
    with pytest.raises(ValueError, match="normalize_embeddings: False, now True"):
        tiny.encode_to_disk(abc, tmp_path, chunk_size=2, normalize_embeddings=True, show_progress_bar=False)
    # an option passed at its default is the same setting as one left out: the folder resumes
    stamp = (tmp_path / "embeddings-00000.npy").stat().st_mtime_ns
    tiny.encode_to_disk(abc, tmp_path, chunk_size=2, normalize_embeddings=False, truncate_dim=None,
                        show_progress_bar=False)
    assert (tmp_path / "embeddings-00000.npy").stat().st_mtime_ns == stamp
    # a fresh start over other inputs: every shard rewritten, the longer run's extra shard removed
    again = tiny.encode_to_disk(xyz[:2], tmp_path, chunk_size=2, resume=False, truncate_dim=8,
                                show_progress_bar=False)
    assert again["rows"] == 2 and sorted(p.name for p in tmp_path.glob("embeddings-*.npy")) == ["embeddings-00000.npy"]
    np.testing.assert_allclose(np.load(tmp_path / "embeddings-00000.npy"),
                               tiny.encode(xyz[:2], convert_to_numpy=True, truncate_dim=8, show_progress_bar=False),
                               atol=1e-6)
    # the same inputs and settings resume: nothing re-encoded
    stamp = (tmp_path / "embeddings-00000.npy").stat().st_mtime_ns
    tiny.encode_to_disk(xyz[:2], tmp_path, chunk_size=2, truncate_dim=8, show_progress_bar=False)
    assert (tmp_path / "embeddings-00000.npy").stat().st_mtime_ns == stamp


def test_encode_to_disk_counts_what_a_prompt_says_and_the_weights(tiny_encoder_dir, tmp_path):
    """A stored prompt counts by its text and the model by its weights, not by names: shards made under another
    instruction, or by a model retrained into the same folder, are never reused."""
    m = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    texts = ["alpha text", "beta text", "gamma text"]
    m.prompts["query"] = "Retrieve passages"
    m.encode_to_disk(texts, tmp_path, prompt_name="query", chunk_size=2, show_progress_bar=False)
    # the same instruction given directly is the same setting
    m.encode_to_disk(texts, tmp_path, prompt="Retrieve passages", chunk_size=2, show_progress_bar=False)
    m.prompts["query"] = "Classify the sentiment"
    with pytest.raises(ValueError, match="instruction: 'Retrieve passages', now 'Classify the sentiment'"):
        m.encode_to_disk(texts, tmp_path, prompt_name="query", chunk_size=2, show_progress_bar=False)
    m.prompts["query"] = "Retrieve passages"
    with torch.no_grad():
        next(m.model.parameters()).view(-1)[0] += 1.0  # "retrained" in place, same path
    with pytest.raises(ValueError, match="other settings \\(weights: "):
        m.encode_to_disk(texts, tmp_path, prompt_name="query", chunk_size=2, show_progress_bar=False)
    with pytest.raises(TypeError, match=r"unexpected encode option\(s\) \['normalise'\]"):
        m.encode_to_disk(texts, tmp_path / "o", normalise=True, show_progress_bar=False)


def test_encode_to_disk_progress_counts_texts_with_a_total(tiny, tmp_path, monkeypatch):
    import llm2vec_fast.encoder as enc

    bars = []

    class Bar:
        def __init__(self, total=None, **kw):
            self.total, self.n, self.desc = total, 0, kw.get("desc")
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(enc, "tqdm", Bar)
    texts = [f"text {i}" for i in range(7)]
    tiny.encode_to_disk(texts, tmp_path, chunk_size=3)
    assert [(b.desc, b.total, b.n) for b in bars] == [("Encoding to disk", 7, 7)]  # one bar, advanced text by text
    tiny.encode_to_disk(iter(texts), tmp_path / "gen", chunk_size=3)
    assert (bars[-1].total, bars[-1].n) == (None, 7)  # a generator has no length
    tiny.encode_to_disk(texts, tmp_path, chunk_size=3)  # resumed shards count too
    assert (bars[-1].total, bars[-1].n) == (7, 7)


def test_int8_of_one_text_needs_ranges(tiny, tmp_path):
    from llm2vec_fast.quantization import quantization_ranges, quantize_embeddings

    calls = []
    real = tiny._encode
    tiny._encode = lambda *a, **k: calls.append(1) or real(*a, **k)
    for one in ("one text", ["one text"]):
        with pytest.raises(ValueError, match="one text gives no range: pass quantization_ranges="):
            tiny.encode(one, precision="int8", show_progress_bar=False)
    assert not calls  # refused before the model runs
    del tiny._encode
    texts = [f"calibration text {i}" for i in range(8)]
    ranges = quantization_ranges(tiny.encode(texts, convert_to_numpy=True, show_progress_bar=False))
    got = tiny.encode("one text", precision="int8", quantization_ranges=ranges, show_progress_bar=False)
    want = quantize_embeddings(tiny.encode("one text", convert_to_numpy=True, show_progress_bar=False), "int8",
                               ranges=ranges)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    with pytest.raises(ValueError, match="quantization_ranges apply to int8/uint8 only"):
        tiny.encode("x", quantization_ranges=ranges, show_progress_bar=False)
    with pytest.raises(ValueError, match="its 1 text gives none: pass quantization_ranges="):
        tiny.encode_to_disk(["a"], tmp_path / "one", precision="int8", show_progress_bar=False)
    manifest = tiny.encode_to_disk(["a"], tmp_path / "one", precision="int8", quantization_ranges=ranges,
                                   show_progress_bar=False)
    assert np.allclose(manifest["quantization_ranges"], ranges)


def test_encode_to_disk_argument_errors(tiny, tmp_path):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {bad!r}"):
            tiny.encode_to_disk(["a"], tmp_path / "x", chunk_size=bad, show_progress_bar=False)
    with pytest.raises(ValueError, match="sentence embeddings only, got output_value='token_embeddings'"):
        tiny.encode_to_disk(["a"], tmp_path / "x", output_value="token_embeddings", show_progress_bar=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        tiny.encode_to_disk(["a"], tmp_path / "file", show_progress_bar=False)
    assert not list((tmp_path / "x").glob("*.npy")) if (tmp_path / "x").exists() else True


def test_non_finite_embeddings_name_their_rows(tiny, monkeypatch):
    """A batch whose embeddings hold NaN raises with the input rows that hold it (batches are collected one behind
    the device, so the error names the rows of the batch that produced it, not of the one after)."""
    items = [f"text {i} " + "word " * (i % 4) for i in range(12)]
    bad = tiny.tokenize([items[7]])["input_ids"].tolist()
    real = tiny.forward

    def forward(f):
        emb = real(f)
        ids, cu = f["input_ids"].tolist(), f["cu_seqlens"].tolist()
        for j in range(len(cu) - 1):
            if ids[cu[j]:cu[j + 1]] == bad:
                emb = emb.clone()
                emb[j] = float("nan")
        return emb

    monkeypatch.setattr(tiny, "forward", forward)
    with pytest.raises(FloatingPointError, match=r"non-finite embeddings for inputs \[7\]"):
        tiny.encode(items, max_batch_tokens=16, show_progress_bar=False)


@pytest.mark.gpu
def test_gpu_encode_under_a_side_stream(tiny_encoder_dir):
    """Encode called under the caller's own CUDA stream: the background thread's copies join that stream, so the
    result equals an encode on the default stream."""
    l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cuda")
    texts = [f"sentence number {i} " * (1 + i % 7) for i in range(200)]
    want = l2v.encode(texts, show_progress_bar=False)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = l2v.encode(texts, show_progress_bar=False)
    side.synchronize()
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_gpu_bf16_encode_matches_fp32_reference(data_dir):
    """The fast path on CUDA (bf16, Triton attention, fused RMSNorm/SwiGLU, packed batches) against the reference
    path (fp32, PyTorch attention, HF's modules): per-row cosine ≥ 0.999, on 300 STS-B sentences and instructed
    pairs, with a random 4-layer Llama large enough for real tiles (hidden 256, GQA 8:2, head dim 32)."""
    from pathlib import Path

    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from llm2vec_fast import fuse_ops
    from llm2vec_fast.fused import fused_ops_of

    folders = [Path(__file__).resolve().parents[2] / ".cache" / "device" / "smollm2"]
    try:
        from llm2vec_fast.models import default_model_folder

        folders.insert(0, default_model_folder())
    except Exception:  # noqa: BLE001 - no default model here (the device machine): the carried tokenizer
        pass
    folder = next((f for f in folders if (f / "tokenizer.json").exists()), None)
    if folder is None:
        pytest.skip("no SmolLM2 tokenizer (default model or .cache/device/smollm2)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, vocab_size=len(tokenizer), max_position_embeddings=512)
    ref_model = LlamaModel(config).cuda().eval()
    fast_model = LlamaModel(config).cuda().to(torch.bfloat16).eval()
    fast_model.load_state_dict(ref_model.state_dict())
    ref = LLM2Vec(to_bidirectional(ref_model, backend="torch"), tokenizer)
    fast = LLM2Vec(fuse_ops(to_bidirectional(fast_model, backend="auto")), tokenizer)
    assert fused_ops_of(fast.model) == ("rms_norm", "gated_mlp", "rope") and fused_ops_of(ref.model) == ()

    lines = (data_dir / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:300]
    texts = [ln.split("\t")[5] for ln in lines]
    items = texts[:200] + [["Retrieve semantically similar text", t] for t in texts[200:]]
    a = fast.encode(items, show_progress_bar=False, max_batch_tokens=2048, convert_to_numpy=True)
    b = ref.encode(items, show_progress_bar=False, convert_to_numpy=True)
    cos = _cos(a, b)
    assert cos.min() >= 0.999, f"worst rows {np.argsort(cos)[:5].tolist()}: {np.sort(cos)[:5].tolist()}"


def test_token_embeddings(tiny, tiny_encoder_dir):
    """output_value="token_embeddings": each input's pooled-span hidden states; their mean is the mean-pooled
    embedding, they do not depend on the batch, and empty texts give no rows."""
    items = ["a short text", "another, somewhat longer text about packed encoders", "   ",
             ["Retrieve a passage", "the instructed text"]]
    toks = tiny.encode(items, output_value="token_embeddings", show_progress_bar=False)
    emb = tiny.encode(items, show_progress_bar=False)
    assert isinstance(toks, list) and len(toks) == 4 and toks[2].shape == (0, emb.shape[1])
    n_text = tiny.tokenize_items([("", items[0]), ("", items[1]), ("", "x"), tuple(items[3])])[2]
    for i in (0, 1, 3):
        assert toks[i].dtype == torch.float32 and toks[i].shape == (n_text[i], emb.shape[1])
        torch.testing.assert_close(toks[i].mean(0), emb[i], rtol=1e-5, atol=1e-6)
    # batch invariance: one text per batch gives the same rows
    alone = tiny.encode(items, output_value="token_embeddings", max_batch_tokens=1, show_progress_bar=False)
    for a, b in zip(alone, toks, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the instruction's tokens are included when they are pooled
    full = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, skip_instruction=False)
    both = full.encode(items[3:], output_value="token_embeddings", show_progress_bar=False)[0]
    assert both.shape[0] > toks[3].shape[0]
    torch.testing.assert_close(both.mean(0), full.encode(items[3:], show_progress_bar=False)[0], rtol=1e-5, atol=1e-6)
    # a single string, numpy, normalised and truncated rows
    one = tiny.encode(items[0], output_value="token_embeddings", convert_to_numpy=True, normalize_embeddings=True,
                      truncate_dim=16, show_progress_bar=False)
    assert isinstance(one, np.ndarray) and one.shape == (n_text[0], 16)
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, rtol=1e-5)


def test_token_embeddings_errors(tiny):
    with pytest.raises(ValueError, match=r"unknown output_value 'tokens'; expected one of"):
        tiny.encode(["x"], output_value="tokens")
    with pytest.raises(ValueError, match=r"float32 only, got precision='int8'"):
        tiny.encode(["x"], output_value="token_embeddings", precision="int8")
    with pytest.raises(ValueError, match="one process: pass one device"):
        tiny.encode(["x"], output_value="token_embeddings", device=["cpu", "cpu"])


def test_budget_batches_is_the_greedy_split():
    # one search per batch gives what adding sequences one by one gives: consecutive batches of at most `budget`
    # tokens, each as full as the next sequence allows, an over-long sequence alone
    import random

    from llm2vec_fast.encoder import _budget_batches

    def greedy(lengths, budget):
        out, start, total = [], 0, 0
        for j, n in enumerate(lengths):
            if j > start and total + n > budget:
                out.append(range(start, j))
                start, total = j, 0
            total += n
        return out + ([range(start, len(lengths))] if len(lengths) > start else [])

    rng = random.Random(0)
    for _ in range(500):
        lengths = sorted((rng.randint(0, 50) for _ in range(rng.randint(0, 30))), reverse=True)
        budget = rng.randint(1, 120)
        assert _budget_batches(np.array(lengths), budget) == greedy(lengths, budget), (lengths, budget)


def test_joint_strings_fast_path_equals_the_marked_path(tiny, monkeypatch):
    """Plain texts skip the separator marking; the strings, cuts and texts are what the marking gives (a text that
    itself contains the separator still takes the marked path)."""
    from llm2vec_fast.encoder import SEPARATOR

    pairs = [("", "a plain text"), ("", ""), ("", f"has {SEPARATOR} inside"), ("an instruction", "text"),
             ("", " leading space"), ("  ", "blank instruction")]
    fast = tiny._joint_strings(pairs)
    monkeypatch.setattr(tiny, "_preparer", lambda **kw: (lambda t: t))  # an identity that is not _unchanged: marked
    assert fast == tiny._joint_strings(pairs)


def test_tokenizer_backend_path_equals_tokenizer_call(tiny, monkeypatch, data_dir):
    """encode tokenizes through the fast tokenizer's Rust backend directly (configured by the tokenizer's own
    set_truncation_and_padding); ids, pooled-span starts and text token counts equal tokenizer.__call__'s, for plain
    and instructed items, empty, blank and special-token texts, truncation at either side, and the user's own later
    calls on the shared tokenizer are unaffected."""
    import llm2vec_fast.encoder as enc

    lines = (data_dir / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()[:40]
    texts = [ln.split("\t")[5] for ln in lines]
    long = " ".join(texts * 3)  # ~880 tokens: past max_length and doc_max_length, truncated
    pairs = ([("", t) for t in texts] + [("Retrieve semantically similar text", t) for t in texts[:10]]
             + [("", ""), ("", "   "), ("", "<|endoftext|> inside <|im_start|>"), ("Instruct:", "<|endoftext|>"),
                ("", long), ("Summarise the passage", long), ("", " leading space"), ("", "naïve café — 東京")])
    import copy

    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    # SmolLM2's tokenizer adds no special tokens; a copy whose template adds a BOS (as Llama's and Mistral's do)
    # covers add_special_tokens and the special-token masks
    backend = copy.deepcopy(tiny.tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert with_bos("x")["input_ids"][0] == 0 and with_bos("x", add_special_tokens=False)["input_ids"][0] != 0
    for tok in (tiny.tokenizer, with_bos):
        monkeypatch.setattr(tiny, "tokenizer", tok)
        assert enc.FAST_TOKENIZE and tiny._rust_backend() is not None  # the path under test is taken
        for side, max_length in (("right", 512), ("right", 24), ("left", 24)):
            monkeypatch.setattr(tok, "truncation_side", side)
            monkeypatch.setattr(tiny, "max_length", max_length)
            got = tiny.tokenize_items(pairs)
            monkeypatch.setattr(enc, "FAST_TOKENIZE", False)
            want = tiny.tokenize_items(pairs)
            monkeypatch.setattr(enc, "FAST_TOKENIZE", True)
            assert len(got[0]) == len(want[0]) == len(pairs)
            for i, (a, b) in enumerate(zip(got[0], want[0], strict=True)):
                assert a.dtype == b.dtype == np.int32 and np.array_equal(a, b), (side, max_length, i)
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2]), (side, max_length)
            longest = max(len(x) for x in got[0])
            assert longest == max_length if max_length < 100 else longest <= max_length  # truncation happened
    # the shared tokenizer's own calls: no truncation unless asked for
    tok = tiny.tokenizer
    monkeypatch.setattr(tok, "truncation_side", "right")
    assert len(tok(long)["input_ids"]) > 512 and tok(long)["input_ids"] == tok([long])["input_ids"][0]


@pytest.mark.triton_cpu  # the Triton backend on CPU tensors
def test_forward_reads_no_cu_seqlens_back_from_the_device(tokenizer, tmp_path, monkeypatch):
    """encode primes the attention kernels and the pooling with each batch's host copies of cu_seqlens and
    pool_start (pack's cu_seqlens_host, pool_start_host), so neither the forward nor the pooling copies them back from
    the device (a synchronisation per batch on a GPU); embeddings equal the unprimed run's. Triton backend under the
    interpreter (head dim 32), fused ops off to keep it quick."""
    from llm2vec_fast.kernels import reference
    from transformers import LlamaConfig, LlamaForCausalLM

    import llm2vec_fast.encoder as enc

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=len(tokenizer))
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = LLM2Vec.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, attn_backend="triton",
                                    fused_ops=False)
    items = ["a short text", "another, somewhat longer text about packed encoders", ["Retrieve a passage", "x y z"],
             "three", "a fourth text of middling length"]
    reads = []
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        if t.dtype == torch.int32 and t.dim() == 1:
            reads.append(tuple(t.shape))
        return real_tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    # pooling's value checks on the batch's int32 tensors (a synchronisation per batch on a GPU; priming checks its
    # int64 host copies)
    checks = []
    real_check = reference._check_pool_values
    monkeypatch.setattr(reference, "_check_pool_values",
                        lambda *a: (checks.append(a) if a[0].dtype == torch.int32 else None) or real_check(*a))
    primed = model.encode(items, max_batch_tokens=24, show_progress_bar=False)
    assert reads == [] and checks == []
    real_pack = enc.pack
    monkeypatch.setattr(enc, "pack", lambda *a: {k: v for k, v in real_pack(*a).items()
                                                 if k not in ("cu_seqlens_host", "pool_start_host")})
    unprimed = model.encode(items, max_batch_tokens=24, show_progress_bar=False)
    assert len(reads) >= 2 and len(checks) >= 2  # one read back per batch without the host copies
    torch.testing.assert_close(primed, unprimed, atol=0, rtol=0)


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_missing_cuda_device_is_a_clear_error(tiny, tiny_encoder_dir, monkeypatch, gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    want = r"'cuda' asked for, but CUDA is not available" if gpus == 0 else r"'cuda:5' asked for, .* 2 CUDA device"
    device = "cuda" if gpus == 0 else "cuda:5"
    with pytest.raises(ValueError, match=want):
        tiny.encode(["a text"], device=device, show_progress_bar=False)
    with pytest.raises(ValueError, match=want):
        LLM2Vec.from_pretrained(str(tiny_encoder_dir), device=device)
    assert tiny.encode(["a text"], device="cpu", show_progress_bar=False).shape == (1, 64)


def test_loading_a_causal_lm_checkpoint_does_not_flag_its_lm_head(tiny_encoder_dir, tmp_path):
    """A *ForCausalLM folder's LM head is an expected leftover for the encoder: no load report for it. A key that is
    really unexpected is still reported, and the model class is left as it was."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import LlamaModel

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.text = ""

        def emit(self, record):
            self.text += record.getMessage() + "\n"

    logger, keep = logging.getLogger("transformers"), Keep()
    logger.addHandler(keep)
    try:
        LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu")
        assert "lm_head" not in keep.text and "UNEXPECTED" not in keep.text, keep.text
        assert "_keys_to_ignore_on_load_unexpected" not in LlamaModel.__dict__
        odd = tmp_path / "odd"
        shutil.copytree(tiny_encoder_dir, odd)
        weights = load_file(str(odd / "model.safetensors"))
        save_file({**weights, "model.extra_block.weight": torch.zeros(2)}, str(odd / "model.safetensors"),
                  metadata={"format": "pt"})
        LLM2Vec.from_pretrained(str(odd), device="cpu")
        assert "extra_block.weight" in keep.text and "lm_head" not in keep.text, keep.text
    finally:
        logger.removeHandler(keep)


def test_an_adapter_saved_from_a_causal_lm_is_applied(tiny_encoder_dir, tmp_path):
    """peft adapters trained on the *ForCausalLM (keys base_model.model.model.layers...) land on the base model the
    encoder holds, merged or not, and give what the adapter on the causal LM gives; an adapter of another
    architecture is refused instead of silently not applied."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    texts = ["A man is playing a flute.", "Two dogs run."]
    base = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    lm = LlamaForCausalLM.from_pretrained(str(tiny_encoder_dir), dtype=torch.float32)
    torch.manual_seed(3)
    peft_lm = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                            init_lora_weights=False))
    peft_lm.save_pretrained(tmp_path / "causal_adapter")
    # the reference: the same adapter on the causal LM's decoder, run through LLM2Vec
    ref = LLM2Vec(to_bidirectional(peft_lm.base_model.model.model), base.tokenizer, pooling_mode="mean")
    want = ref.encode(texts, show_progress_bar=False)
    for merge in (False, True):
        got = LLM2Vec.from_pretrained(str(tiny_encoder_dir), peft_model_name_or_path=str(tmp_path / "causal_adapter"),
                                      merge_peft=merge, device="cpu", dtype=torch.float32)
        out = got.encode(texts, show_progress_bar=False)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
        assert (out - base.encode(texts, show_progress_bar=False)).abs().max() > 1e-3  # the adapter does something
    # an adapter whose modules this model does not have
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "other_adapter"
    peft_lm.save_pretrained(bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "attention"): v for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit this LlamaModel: \d+ of its weights match no module"):
        LLM2Vec.from_pretrained(str(tiny_encoder_dir), peft_model_name_or_path=str(bad), device="cpu")


# ---------------------------------------------------------------- the original's lower-level API
def test_tokenize_reads_the_originals_joint_strings(tiny):
    """The original's collators build "instruction; " + SEPARATOR + text (then prepare it) and call tokenize and
    forward: the instruction attends but is not pooled, and a prepared text is not prepared again."""
    from llm2vec_fast.encoder import SEPARATOR

    want = tiny.encode([["Given a question, retrieve passages;", "What is he playing?"]], show_progress_bar=False)
    joint = f"Given a question, retrieve passages; {SEPARATOR}What is he playing?"
    with torch.no_grad():
        got = tiny(tiny.tokenize([joint]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    mode = tiny.pooling_mode
    try:
        tiny.pooling_mode = "eos_token"
        prepared = tiny.prepare_for_tokenization(f"{SEPARATOR}a short text")
        assert prepared.endswith(" </s>") and tiny.prepare_for_tokenization(prepared) == prepared
        with torch.no_grad():
            got = tiny(tiny.tokenize([prepared]))
        torch.testing.assert_close(got, tiny.encode(["a short text"], show_progress_bar=False), rtol=1e-5, atol=1e-6)
        # encode wraps every text as the original's encode does, even one that ends with the eos string already
        text = "Close the strikethrough with </s>"
        ids, _, _ = tiny.tokenize_items([("", text)])
        want_ids = tiny.tokenizer(text + " </s>")["input_ids"]
        assert ids[0].tolist() == want_ids and len(want_ids) > len(tiny.tokenizer(text)["input_ids"])
    finally:
        tiny.pooling_mode = mode


@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_and_get_pooling_take_padded_features(tiny, side):
    """The original's padded features (input_ids, attention_mask, embed_mask [B, L]) are packed by forward; the
    embed_mask's tokens are the pooled ones."""
    from llm2vec_fast.encoder import SEPARATOR

    items = [["An instruction", "first text here"], ["", "second"]]
    want = tiny.encode(items, show_progress_bar=False)
    tok = tiny.tokenizer
    rows = []
    for instr, text in items:
        ids = tok(tiny._convert_to_str(instr, text).replace(SEPARATOR, ""))["input_ids"]
        n_text = len(tok(text, add_special_tokens=False)["input_ids"])
        rows.append((ids, n_text))
    L = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask, embed = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for i, (ids, n_text) in enumerate(rows):
        lo = L - len(ids) if side == "left" else 0
        input_ids[i, lo:lo + len(ids)] = torch.tensor(ids)
        mask[i, lo:lo + len(ids)] = 1
        embed[i, lo + len(ids) - n_text:lo + len(ids)] = 1
    features = {"input_ids": input_ids, "attention_mask": mask, "embed_mask": embed}
    with torch.no_grad():
        torch.testing.assert_close(tiny(features), want, rtol=1e-5, atol=1e-6)
        packed = tiny.tokenize(items)
        hidden = tiny.hidden_states(packed)
        torch.testing.assert_close(tiny.get_pooling(packed, hidden), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one \\[B, L\\] shape"):
        tiny({"input_ids": input_ids, "attention_mask": mask[:, 1:]})


def test_llama3_instruct_eos_pooling_ends_at_its_eot(tiny):
    name, mode = tiny.model.config._name_or_path, tiny.pooling_mode
    try:
        tiny.model.config._name_or_path, tiny.pooling_mode = "meta-llama/Meta-Llama-3-8B-Instruct", "eos_token"
        assert tiny.prepare_for_tokenization("hello world") == \
            "<|start_header_id|>user<|end_header_id|>\n\nhello world<|eot_id|>"
    finally:
        tiny.model.config._name_or_path, tiny.pooling_mode = name, mode


def test_original_input_forms_and_methods(tiny):
    class Column:  # a datasets Column: sized, indexable, iterable, not a list
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

        def __iter__(self):
            return iter(self.items)

    want = tiny.encode(["a b", "c"], show_progress_bar=False)
    torch.testing.assert_close(tiny.encode(Column(["a b", "c"]), show_progress_bar=False), want)
    pair = tiny.encode([["instr", "text"]], show_progress_bar=False)
    torch.testing.assert_close(tiny.encode([["instr", "text", 0]], show_progress_bar=False), pair)
    torch.testing.assert_close(tiny.encode(["instr", "text", 0], show_progress_bar=False), pair)  # one MEDI item
    assert tiny.tokenizer.padding_side == "left" and tiny.tokenizer.pad_token is not None
    assert tiny._text_length("abc") == 3 and tiny._text_length([[1, 2], [3]]) == 3
    assert tiny._convert_to_str("Instr ", "text") == "Instr !@#$%^&*()text"
    f = {"attention_mask": torch.ones(1, 3), "embed_mask": torch.tensor([[0, 1, 1]])}
    tiny._skip_instruction(f)
    assert f["attention_mask"].tolist() == [[0, 1, 1]]
    n = tiny.model.get_input_embeddings().weight.shape[0]
    assert tiny.resize_token_embeddings(n).weight.shape[0] == n
    tiny.gradient_checkpointing_enable()  # forwarded to the model (the Trainer calls it)
    assert tiny.model.is_gradient_checkpointing
    tiny.model.gradient_checkpointing_disable()


def test_an_mntp_release_without_base_weights_loads(tiny_encoder_dir, tmp_path):
    """The MNTP releases as the hub serves them: config, adapter and tokenizer, the weights named by the adapter's
    base_model_name_or_path. Loaded with the adapter merged, as from the base plus the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(3)
    peft = get_peft_model(AutoModel.from_pretrained(tiny_encoder_dir), LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "up_proj"]))
    release = tmp_path / "release"
    peft.save_pretrained(release)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_encoder_dir) / name, release / name)
    cfg = json.loads((release / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_encoder_dir)
    (release / "adapter_config.json").write_text(json.dumps(cfg))
    got = LLM2Vec.from_pretrained(str(release), device="cpu", dtype=torch.float32)
    want = LLM2Vec.from_pretrained(str(tiny_encoder_dir), peft_model_name_or_path=str(release), merge_peft=True,
                                   device="cpu", dtype=torch.float32)
    items = ["one text", ["an instruction", "two"]]
    torch.testing.assert_close(got.encode(items, show_progress_bar=False), want.encode(items, show_progress_bar=False),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- shard folders (production review)
def test_shard_folder_lock_and_refusals_leave_it_resumable(tiny, tmp_path):
    import os

    texts = [f"text number {i}" for i in range(9)]
    out = tmp_path / "shards"
    first = tiny.encode_to_disk(texts, out, chunk_size=3, show_progress_bar=False)
    fcntl = pytest.importorskip("fcntl")
    # another live run holds the folder's lock: refused, naming it
    (out / ".lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere"}))
    fd = os.open(out / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ValueError, match=r"is being written by another run \(pid 4242 on elsewhere\)"):
            tiny.encode_to_disk(texts, out, chunk_size=3, show_progress_bar=False)
    finally:
        os.close(fd)
    # a lock file nobody holds (its run was killed: empty, a reused pid, our own pid) is taken over
    for content in ("", json.dumps({"pid": os.getpid(), "host": "here"})):
        (out / ".lock").write_text(content)
        assert tiny.encode_to_disk(texts, out, chunk_size=3, show_progress_bar=False)["complete"]
        assert not (out / ".lock").exists()
    # a run refused half-way (other inputs in shard 1) leaves the complete folder as it was
    before = (out / "manifest.json").read_text()
    changed = texts[:4] + ["CHANGED"] + texts[5:]
    with pytest.raises(ValueError, match="embeddings-00001.npy holds the embeddings of other inputs"):
        tiny.encode_to_disk(changed, out, chunk_size=3, show_progress_bar=False)
    assert (out / "manifest.json").read_text() == before and first["complete"]


def test_shard_folder_model_path_spellings_and_write_errors(tiny_encoder_dir, tmp_path, monkeypatch):
    import llm2vec_fast.encoder as enc

    monkeypatch.chdir(Path(tiny_encoder_dir).parent)
    rel = LLM2Vec.from_pretrained(Path(tiny_encoder_dir).name, device="cpu", dtype=torch.float32)
    rel.encode_to_disk(["a", "b", "c"], tmp_path / "s", chunk_size=2, show_progress_bar=False)
    absolute = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    assert absolute.encode_to_disk(["a", "b", "c"], tmp_path / "s", chunk_size=2, show_progress_bar=False)["complete"]

    def full_disk(f, array):
        f.write(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(enc.np, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write .*embeddings-00000.npy: No space left on device"):
        absolute.encode_to_disk(["d", "e"], tmp_path / "t", chunk_size=2, show_progress_bar=False)
    assert not list((tmp_path / "t").glob("*.partial")) and not (tmp_path / "t" / ".lock").exists()
    monkeypatch.undo()
    real_write = Path.write_text

    def manifest_full(self, text, *a, **kw):
        if self.name == "manifest.json.partial":
            real_write(self, text[:5])
            raise OSError(27, "File too large")
        return real_write(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", manifest_full)
    with pytest.raises(OSError, match=r"cannot write .*manifest.json: File too large"):
        absolute.encode_to_disk(["d", "e"], tmp_path / "u", chunk_size=2, show_progress_bar=False)
    assert not list((tmp_path / "u").glob("*.partial"))


def test_dtype_auto_is_recorded_for_reloading_workers(tiny_encoder_dir):
    """dtype="auto" (the checkpoint's own dtype, as sentence-transformers' torch_dtype "auto" asks) is what a
    reloading worker process is told, not "None"."""
    l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype="auto")
    assert l2v._source["dtype"] == "auto"
    again = LLM2Vec.from_pretrained(**l2v._source)
    assert next(again.parameters()).dtype == next(l2v.parameters()).dtype
