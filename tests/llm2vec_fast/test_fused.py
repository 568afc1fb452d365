"""fuse_ops: HF RMSNorm / SwiGLU modules routed through the fused Triton ops (interpreter on CPU, kernels on GPU)."""
import copy
import pickle

import pytest
import torch

from llm2vec_fast import LLM2Vec, fuse_ops, to_bidirectional, to_packed_causal, unfuse_ops
from llm2vec_fast.fused import fused_ops_of

from .conftest import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _packed(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    m = max(lengths)
    # use_cache=False as the encoder and the trainers pass it (with a KV cache, attention keeps HF's forward)
    return dict(input_ids=ids[None].to(DEVICE), position_ids=pos[None].to(DEVICE), cu_seq_lens_q=cu.to(DEVICE),
                cu_seq_lens_k=cu.to(DEVICE), max_length_q=m, max_length_k=m, use_cache=False)


def _count(model, cls_suffix):
    return sum(type(m).__name__.endswith(cls_suffix) for m in model.modules())


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


# qwen3: per-head q/k norms on head_dim as well; gemma*: (1 + weight) norms and GeGLU MLPs. The window and softcap
# cases check that the fused attention passes what HF's own forward passes: Mistral's window comes from its config
# (causal models keep it), and Gemma 3 leaves its config's attn_logit_softcapping unused
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                        "llama-causal", "gemma2-long", "mistral-causal-window",
                                        "gemma3_text-softcap"])
def test_fused_model_matches_hf_forward_and_backward(model_type):
    overrides = {}
    if model_type.endswith("-window"):
        overrides["sliding_window"] = 3
    if model_type.endswith("-softcap"):
        overrides["attn_logit_softcapping"] = 2.0
    model_type = model_type.removesuffix("-window").removesuffix("-softcap")
    causal = model_type.endswith("-causal")
    long = model_type.endswith("-long")  # a sequence past Gemma 2's sliding window (64): windowed layers
    model_type = model_type.removesuffix("-causal").removesuffix("-long")
    model = tiny_model(model_type, intermediate_size=96, **overrides).to(DEVICE)
    (to_packed_causal if causal else to_bidirectional)(model, backend="torch")
    twin = copy.deepcopy(model)
    fuse_ops(model, backend="triton")
    assert fused_ops_of(model) == ("rms_norm", "gated_mlp", "rope") and fused_ops_of(twin) == ()
    patched = sum("forward" in m.__dict__ for m in model.modules())
    assert patched == _count(model, "RMSNorm") + _count(model, "MLP") + _count(model, "Attention")

    kw = _packed([70, 1, 9] if long else [5, 1, 9])
    model.train(), twin.train()  # no dropout in these configs; gradients through every fused module
    got, expected = model(**kw).last_hidden_state, twin(**kw).last_hidden_state
    assert torch.isfinite(got).all()
    assert _rel(got, expected) <= 1e-5
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (expected * g).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert _rel(p.grad, q.grad) <= 1e-4, name


def test_auto_backend_keeps_hf_forward_on_cpu(monkeypatch):
    """"auto" runs the kernels on CUDA tensors only: on CPU the HF forward answers (the kernel is never called)."""
    import llm2vec_fast.kernels as kernels
    import llm2vec_fast.kernels.rmsnorm as rmsnorm_mod
    import llm2vec_fast.kernels.swiglu as swiglu_mod
    from llm2vec_fast.kernels.reference import rms_norm_ref, rope_ref, silu_mul_ref

    calls = []
    monkeypatch.setattr(rmsnorm_mod, "rms_norm", lambda *a, **k: calls.append("rms_norm") or rms_norm_ref(*a, **k))
    monkeypatch.setattr(swiglu_mod, "silu_mul", lambda *a: calls.append("silu_mul") or silu_mul_ref(*a))
    monkeypatch.setattr(kernels, "rope", lambda *a: calls.append("rope") or rope_ref(*a), raising=False)
    model = to_bidirectional(tiny_model("llama"), backend="torch")  # rope: packed batches to our attention only
    twin = copy.deepcopy(model)
    fuse_ops(model)  # auto
    kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in _packed([4, 3]).items()}
    with torch.no_grad():
        assert torch.equal(model(**kw).last_hidden_state, twin(**kw).last_hidden_state)
    assert calls == []
    # "triton": the ops are what runs, one call per norm (2 per layer + the final one), per MLP and per attention
    fuse_ops(model, backend="triton")
    with torch.no_grad():
        model(**kw)
    layers = model.config.num_hidden_layers
    assert sorted(calls) == ["rms_norm"] * (2 * layers + 1) + ["rope"] * layers + ["silu_mul"] * layers
    # a padded batch keeps HF's rotary embedding (the kernel takes packed sequences)
    calls.clear()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (2, 5)), attention_mask=torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))
        model(**{**kw, "use_cache": True})  # and so does a call that fills a KV cache
    assert "rope" not in calls


def test_unfuse_pickle_and_families():
    model = fuse_ops(tiny_model("mistral"))
    clone = pickle.loads(pickle.dumps(model))  # encode worker processes receive the model pickled
    assert fused_ops_of(clone) == ("rms_norm", "gated_mlp", "rope")
    norm = next(m for m in clone.modules() if type(m).__name__.endswith("RMSNorm"))
    assert norm.forward.args[0] is norm  # bound to the copy, not to the original module
    assert fused_ops_of(copy.deepcopy(model)) == ("rms_norm", "gated_mlp", "rope")
    unfuse_ops(model)
    assert fused_ops_of(model) == () and not any("forward" in m.__dict__ for m in model.modules())
    assert fused_ops_of(fuse_ops(tiny_model("llama"), ops="rms_norm")) == ("rms_norm",)
    # Gemma: its (1 + weight) norms and GeGLU MLPs, Gemma's way
    gemma = fuse_ops(tiny_model("gemma"))
    assert fused_ops_of(gemma) == ("rms_norm", "gated_mlp", "rope")
    norm = next(m for m in gemma.modules() if type(m).__name__ == "GemmaRMSNorm")
    mlp = next(m for m in gemma.modules() if type(m).__name__ == "GemmaMLP")
    assert norm.forward.args[2] is True and mlp.forward.args[2] == "gelu_tanh"
    # an activation the kernels do not have (exact GELU) keeps its MLP
    gelu = fuse_ops(tiny_model("llama", hidden_act="gelu"))
    assert fused_ops_of(gelu) == ("rms_norm", "rope")
    with pytest.raises(ValueError, match=r"unknown fused op\(s\) \['layernorm'\]"):
        fuse_ops(tiny_model("llama"), ops=("rms_norm", "layernorm"))
    with pytest.raises(ValueError, match="unknown fused-op backend 'cuda'"):
        fuse_ops(tiny_model("llama"), backend="cuda")


def test_lora_gradients_flow_through_fused_mlp():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", intermediate_size=96).to(DEVICE)
    to_bidirectional(model, backend="torch")
    twin = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = get_peft_model(fuse_ops(model, backend="triton"), cfg)
    torch.manual_seed(1)
    twin = get_peft_model(twin, cfg)
    kw = _packed([6, 2])
    # a random projection: mean(h²) of a normalised output is nearly constant, its gradient rounding noise
    g = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    losses = [(m(**kw).last_hidden_state[0] * g).sum() for m in (model, twin)]
    for loss in losses:
        loss.backward()
    a, b = (float(loss.detach()) for loss in losses)
    assert abs(a - b) <= 1e-5 * abs(b)
    lora = [(n, p.grad) for n, p in model.named_parameters() if "lora_" in n]
    ref = dict((n, p.grad) for n, p in twin.named_parameters() if "lora_" in n)
    assert lora and all(g is not None and _rel(g, ref[n]) <= 1e-4 for n, g in lora)


def test_from_pretrained_fuses_unless_reference_path(tiny_encoder_dir):
    fused = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    assert fused_ops_of(fused.model) == ("rms_norm", "gated_mlp", "rope")
    ref = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, attn_backend="torch")
    assert fused_ops_of(ref.model) == ()
    off = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, fused_ops=False)
    assert fused_ops_of(off.model) == ()
    texts = ["a short text", "another, somewhat longer text about encoders"]
    torch.testing.assert_close(fused.encode(texts, show_progress_bar=False), ref.encode(texts, show_progress_bar=False),
                               rtol=1e-5, atol=1e-6)
