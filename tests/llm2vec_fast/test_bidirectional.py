"""to_bidirectional on every supported family: bidirectional, exact vs an independent eager computation, packed
equals padded, the causal path untouched."""
import copy

import pytest
import torch

from llm2vec_fast import SUPPORTED_MODEL_TYPES, to_bidirectional, to_packed_causal
from llm2vec_fast.bidirectional import cu_seqlens_from_position_ids, set_attention_dropout

from .conftest import tiny_config, tiny_model

FAMILIES = list(SUPPORTED_MODEL_TYPES)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _eager_bidirectional(model, ids):
    """Independent reference: HF's own eager attention with an all-visible 4D mask (HF passes 4D masks through)."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    bsz, seq = ids.shape
    mask = torch.zeros(bsz, 1, seq, seq)  # additive: 0 everywhere = every token sees every token
    return ref(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bidirectional_matches_eager_reference(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 256, (2, 13))
    expected = _eager_bidirectional(model, ids)
    to_bidirectional(model, backend="torch")
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    assert _rel(got, expected) <= 1e-5


@pytest.mark.parametrize("model_type", FAMILIES)
def test_first_token_sees_later_tokens(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 256, (1, 9))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 256
    with torch.no_grad():
        causal_a, causal_b = model(input_ids=ids).last_hidden_state, model(input_ids=ids2).last_hidden_state
        # causal before conversion: the first token cannot see the last
        torch.testing.assert_close(causal_a[0, 0], causal_b[0, 0])
        to_bidirectional(model)
        a, b = model(input_ids=ids).last_hidden_state, model(input_ids=ids2).last_hidden_state
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def _padded(seqs, side):
    """A [B, max_len] batch of seqs, padded on ``side``, and its 2D attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_equals_padded(model_type):
    model = to_bidirectional(tiny_model(model_type), backend="torch")
    lengths = [5, 1, 9]
    seqs = [torch.randint(0, 256, (n,)) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs)[None], position_ids=pos[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=9, max_length_k=9).last_hidden_state[0]
        # positions alone (no cu_seqlens) mark the boundaries too
        from_pos = model(input_ids=torch.cat(seqs)[None], position_ids=pos[None]).last_hidden_state[0]
        for side in ("right", "left"):
            ids, mask = _padded(seqs, side)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            padded = out[mask.bool()]
            assert _rel(packed, padded) <= 1e-5, side
    assert _rel(from_pos, packed) <= 1e-6


def test_converting_one_model_leaves_others_causal():
    a, b = tiny_model("llama", seed=1), tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        before = b(input_ids=ids).last_hidden_state
        to_bidirectional(a)
        after = b(input_ids=ids).last_hidden_state
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert b.config._attn_implementation == "sdpa" and b.layers[0].self_attn.is_causal


@pytest.mark.parametrize("convert", [to_bidirectional, to_packed_causal])
def test_converting_one_model_leaves_a_model_sharing_its_config_as_it_was(convert):
    """Two from_config calls on one config object share it (transformers 5): the converted model's attention name then
    reaches the other model too, whose own modules still say what it is (causal), and it stays that."""
    from transformers import AutoModel

    config = tiny_config("llama")
    torch.manual_seed(1)
    a = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    b = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    assert a.config is b.config
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        before = b(input_ids=ids).last_hidden_state
        causal_a = a(input_ids=ids).last_hidden_state
        convert(a, backend="torch")
        after = b(input_ids=ids).last_hidden_state
        converted = a(input_ids=ids).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    if convert is to_bidirectional:  # while the converted one is bidirectional
        assert (converted - causal_a).abs().max() > 1e-2


@pytest.mark.triton_cpu  # the Triton backend on CPU tensors
def test_bidirectional_model_keeps_no_kv_cache_by_default(monkeypatch):
    """A converted encoder's forward builds no KV cache unless asked (config.use_cache False), so a packed forward
    without use_cache=False takes the fused RoPE attention path rather than HF's own; the causal conversion keeps the
    config's cache setting."""
    import llm2vec_fast.kernels as K

    from llm2vec_fast import fuse_ops

    m = to_bidirectional(tiny_model("llama", seed=2, head_dim=32, hidden_size=128), "triton")
    fuse_ops(m, ops=("rope",), backend="triton")
    assert m.config.use_cache is False
    calls = []
    real = K.rope
    monkeypatch.setattr(K, "rope", lambda *a: calls.append(1) or real(*a))
    lens = torch.tensor([3, 5], dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    ids = torch.randint(0, 256, (1, 8))
    pos = torch.cat([torch.arange(3), torch.arange(5)])[None]
    with torch.no_grad():
        out = m(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    assert out.past_key_values is None and len(calls) == m.config.num_hidden_layers
    causal = to_packed_causal(tiny_model("llama", seed=2))
    assert causal.config.use_cache is True


def test_causal_lm_wrapper_and_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(tiny_config("qwen2"), attn_implementation="sdpa").eval()
    ids = torch.randint(0, 256, (1, 6))
    expected = _eager_bidirectional(lm.model, ids)
    peft = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    to_bidirectional(peft)
    with torch.no_grad():
        got = peft(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert _rel(got, expected) <= 1e-5


def test_unsupported_family_and_bad_backend():
    from transformers import AutoConfig, AutoModel

    gpt2 = AutoModel.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*gemma2"):
        to_bidirectional(gpt2)
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn'"):
        to_bidirectional(tiny_model("llama"), backend="cudnn")


def test_gemma2_long_input_uses_bidirectional_window():
    """Past the sliding window, Gemma-2's sliding layers see |i - j| < window only (both directions)."""
    model = tiny_model("gemma2", sliding_window=4)
    ids = torch.randint(0, 256, (1, 10))
    to_bidirectional(model, backend="torch")
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    ref = tiny_model("gemma2", sliding_window=4)  # same seed: same weights, still causal and eager
    # independent: HF's eager attention with explicit masks per layer type (Gemma-2 takes a prepared mask mapping)
    i = torch.arange(10)
    band = (i[:, None] - i[None, :]).abs() < 4
    masks = {"full_attention": torch.zeros(1, 1, 10, 10),
             "sliding_attention": torch.zeros(1, 1, 10, 10).masked_fill(~band, float("-inf"))}
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=masks).last_hidden_state
    assert _rel(got, expected) <= 1e-5


def test_cu_seqlens_from_position_ids():
    cu, m = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1]]))
    assert cu.tolist() == [0, 3, 4, 6] and cu.dtype == torch.int32 and m == 3


def test_attention_dropout_only_in_training():
    model = to_bidirectional(tiny_model("llama"), backend="torch")
    set_attention_dropout(model, 0.3)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        e1, e2 = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(e1, e2, rtol=0, atol=0)
        model.train()
        t1, t2 = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert (t1 - t2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="attention dropout must be in"):
        set_attention_dropout(model, 1.5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_triton_backend_matches_torch(model_type):
    """Whole-model check of the Triton kernel (interpreter on CPU, real kernel on GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(model_type, head_dim=32).to(device)  # the kernel's smallest head dim
    twin = copy.deepcopy(model)
    to_bidirectional(model, backend="triton")
    to_bidirectional(twin, backend="torch")
    lengths = [3, 1, 6]
    ids = torch.randint(0, 256, (sum(lengths),), device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32, device=device)
    kw = dict(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6,
              max_length_k=6)
    with torch.no_grad():
        got, expected = model(**kw).last_hidden_state, twin(**kw).last_hidden_state
    assert _rel(got, expected) <= 1e-4  # fp32 kernel (tf32-free on CPU); GPU tf32 dots stay well inside this


@pytest.mark.parametrize("convert", [to_bidirectional, to_packed_causal], ids=["bidirectional", "causal"])
def test_triton_backend_runs_gemma2_sliding_windows(convert):
    """Past Gemma-2's sliding window the Triton kernel takes the window itself (|i - j| < W, causal i - j < W) and
    matches the torch path, packed and padded."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("gemma2", head_dim=32, sliding_window=4).to(device)
    twin = copy.deepcopy(model)
    convert(model, backend="triton")
    convert(twin, backend="torch")
    seqs = [torch.randint(0, 256, (n,)) for n in (9, 1, 6)]
    with torch.no_grad():
        got, expected = (m(**_packed_kwargs(seqs, device)).last_hidden_state for m in (model, twin))
        assert _rel(got, expected) <= 1e-4
        ids, mask = _padded(seqs, "right")
        padded = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        assert _rel(padded[mask.bool().to(device)], expected[0]) <= 1e-4
        full = copy.deepcopy(twin)
        full.config.sliding_window = 64
        for layer in full.layers:
            layer.self_attn.sliding_window = 64 if getattr(layer.self_attn, "sliding_window", None) else None
        unwindowed = full(**_packed_kwargs(seqs, device)).last_hidden_state
    assert _rel(unwindowed, expected) > 1e-3  # the window matters for these inputs


# ---------------------------------------------------------------------------------------------------------------------
# to_packed_causal: the decoder's own causal attention, per sequence on packed batches
# ---------------------------------------------------------------------------------------------------------------------
def _packed_kwargs(seqs, device="cpu"):
    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return dict(input_ids=torch.cat(seqs).to(device)[None], position_ids=pos[None], cu_seq_lens_q=cu,
                cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_packed_causal_equals_hf_causal_per_sequence(model_type):
    """Independent reference: the unconverted model (HF's own causal SDPA) on each sequence alone, unpadded."""
    model = tiny_model(model_type)
    seqs = [torch.randint(0, 256, (n,)) for n in (5, 1, 9)]
    with torch.no_grad():
        expected = torch.cat([model(input_ids=s[None]).last_hidden_state[0] for s in seqs])
        to_packed_causal(model, backend="torch")
        packed = model(**_packed_kwargs(seqs)).last_hidden_state[0]
        assert _rel(packed, expected) <= 1e-5
        for side in ("right", "left"):
            ids, mask = _padded(seqs, side)
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert not out.isnan().any(), side  # left padding: padded rows must not turn into NaN
            assert _rel(out[mask.bool()], expected) <= 1e-5, side
    assert model.config._attn_implementation == "llm2vec_fast_causal"


@pytest.mark.parametrize("model_type, window", [("mistral", dict(sliding_window=4)),
                                                ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                                               max_window_layers=0))])
def test_packed_causal_keeps_mistral_and_qwen2_windows(model_type, window):
    """A causal Mistral / Qwen2 keeps its sliding window (HF's own causal path applies it); bidirectional ones
    ignore it, as the original llm2vec does."""
    model = tiny_model(model_type, **window)
    seqs = [torch.randint(0, 256, (n,)) for n in (10, 3, 7)]
    with torch.no_grad():
        expected = torch.cat([model(input_ids=s[None]).last_hidden_state[0] for s in seqs])
        full = tiny_model(model_type)  # the same weights (same seed), no window
        unwindowed = torch.cat([full(input_ids=s[None]).last_hidden_state[0] for s in seqs])
        assert _rel(unwindowed, expected) > 1e-3  # the window matters for these inputs
        to_packed_causal(model, backend="torch")
        assert _rel(model(**_packed_kwargs(seqs)).last_hidden_state[0], expected) <= 1e-5
        assert _rel(model(input_ids=seqs[0][None]).last_hidden_state[0], expected[:10]) <= 1e-5
        bidir = to_bidirectional(copy.deepcopy(full), backend="torch")
        ref = to_bidirectional(model, backend="torch")
        assert _rel(ref(**_packed_kwargs(seqs)).last_hidden_state, bidir(**_packed_kwargs(seqs)).last_hidden_state) \
            <= 1e-5


def test_packed_causal_gemma2_window_and_errors():
    """Past the sliding window, Gemma-2's sliding layers see 0 <= i - j < window, as HF's own causal path does."""
    model = tiny_model("gemma2", sliding_window=4)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        to_packed_causal(model, backend="torch")
        got = model(input_ids=ids).last_hidden_state
    assert _rel(got, expected) <= 1e-5
    from transformers import AutoConfig, AutoModel

    gpt2 = AutoModel.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported for packed causal attention"):
        to_packed_causal(gpt2)
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa'"):
        to_packed_causal(tiny_model("llama"), backend="sdpa")
    with pytest.raises(ValueError, match="Linear has no Hugging Face config"):
        to_bidirectional(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_packed_causal_triton_matches_torch(model_type):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(model_type, head_dim=32).to(device)
    twin = copy.deepcopy(model)
    to_packed_causal(model, backend="triton")
    to_packed_causal(twin, backend="torch")
    kw = _packed_kwargs([torch.randint(0, 256, (n,)) for n in (3, 1, 6)], device)
    with torch.no_grad():
        got, expected = model(**kw).last_hidden_state, twin(**kw).last_hidden_state
    assert _rel(got, expected) <= 1e-4


@pytest.mark.parametrize("cu, max_len, message", [
    ([0, 4, 8], 6, "cu_seqlens\\[-1\\] must equal total_tokens = q.shape\\[0\\] = 10, got 8"),
    ([0, 6, 4, 10], 6, "non-decreasing"),
    ([0, 4, 10], 3, "max_seqlen=3 is smaller than the longest sequence"),
])
def test_torch_backend_checks_packed_boundaries(cu, max_len, message):
    model = to_bidirectional(tiny_model("llama"), backend="torch")
    ids = torch.randint(0, 256, (1, 10))
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(10)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=max_len, max_length_k=max_len)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_torch_attention_slices_and_gathers_alike(causal):
    """The torch backend attends each length's sequences together: in place where each length is one run of
    neighbours (encode's longest-first packs), through a gather otherwise; the same groups either way, so each
    sequence's output is bit-for-bit the same, and equal to its own attention alone."""
    from llm2vec_fast.bidirectional import _torch_attention, packed_torch_attention

    g = torch.Generator().manual_seed(0)
    lens = [5, 5, 3, 3, 0, 1]
    seqs = [[torch.randn(n, h, 16, generator=g) for h in (4, 2, 2)] for n in lens]

    def run(order):
        q, k, v = (torch.cat([seqs[i][j] for i in order]) for j in range(3))
        cu = torch.tensor([0, *torch.tensor([lens[i] for i in order]).cumsum(0).tolist()], dtype=torch.int32)
        out = packed_torch_attention(q, k, v, cu, 5, 0.25, causal=causal)
        return {i: out[cu[j]:cu[j + 1]] for j, i in enumerate(order)}

    runs = run([0, 1, 2, 3, 4, 5])  # one run per length: sliced in place
    gathered = run([0, 2, 1, 4, 3, 5])  # lengths interleaved: gathered
    for i, (q, k, v) in enumerate(seqs):
        assert torch.equal(runs[i], gathered[i])
        if lens[i]:
            alone = _torch_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2), None,
                                     0.25, 0.0, 0.0, None, causal)[0]
            torch.testing.assert_close(runs[i], alone, rtol=1e-5, atol=1e-6)
