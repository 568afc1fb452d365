"""fuse_lora: peft LoRA layers through one autograd function that keeps x instead of dropout copies and masks."""
import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from llm2vec_fast.lora import LoRAAddFunction, _dropout, fuse_lora, is_lora_fused, lora_add, unfuse_lora
from llm2vec_fast.training.common import add_lora, enable_checkpointing

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(params=["kept", "regenerated"])
def cpu_mask(request, monkeypatch):
    """CPU tensors keep their dropout mask by default (CUDA regenerates it): run the test both ways."""
    import llm2vec_fast.lora as lora_mod

    monkeypatch.setattr(lora_mod, "KEEP_MASK_ON_CPU", request.param == "kept")
    return request.param


# a CPU case that forces a Triton kernel: runs under the interpreter only (compiled Triton takes CUDA tensors)
CPU_TRITON = pytest.param("cpu", marks=pytest.mark.triton_cpu)

def _base(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attn_implementation="eager")
    return LlamaModel(cfg).to(dtype)


def _pair(dropout, seed=0, dtype=torch.float32, fused=True):
    """(peft model, fused twin) with the same nonzero adapter weights (a fresh lora_B is zero: no gradient to A)."""
    peft_model = add_lora(_base(seed, dtype), r=4, dropout=dropout, fused=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    twin = copy.deepcopy(peft_model)
    if fused:
        fuse_lora(twin)
    return peft_model, twin


def _run(model, seed=5, n=13, embeds=None):
    """Output and gradients (adapter weights and the input embeddings) of one train-mode step from ``seed``."""
    model.train()
    torch.manual_seed(seed)
    ids = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(3))
    w = next(model.parameters())
    ids = ids.to(w.device)
    emb = model.get_input_embeddings()(ids).detach().float() if embeds is None else embeds
    emb = emb.to(w.device, w.dtype).requires_grad_(True)
    out = model(inputs_embeds=emb).last_hidden_state
    out.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), emb.grad.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft_in_fp32(dropout, cpu_mask):
    peft_model, fused = _pair(dropout)
    assert is_lora_fused(fused) and not is_lora_fused(peft_model)
    out0, gin0, g0 = _run(peft_model)
    out1, gin1, g1 = _run(fused)
    # same seed, same dropout draws: equal to float32 rounding
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gin1, gin0, rtol=1e-5, atol=1e-7)
    assert g1.keys() == g0.keys() and len(g0) == 2 * 2 * 7  # A and B of 7 layers in 2 blocks
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_fused_lora_dropout_is_live():
    _, fused = _pair(0.3)
    out_a = _run(fused, seed=1)[0]
    out_b = _run(fused, seed=2)[0]
    out_a2 = _run(fused, seed=1)[0]
    assert torch.equal(out_a, out_a2)
    assert (out_a - out_b).abs().max() > 1e-3
    fused.eval()
    with torch.no_grad():
        ids = torch.randint(0, 100, (2, 9))
        torch.manual_seed(1)
        e1 = fused(input_ids=ids).last_hidden_state
        torch.manual_seed(2)
        e2 = fused(input_ids=ids).last_hidden_state
    assert torch.equal(e1, e2)  # eval: no dropout


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_lora_under_checkpointing_regenerates_the_same_masks(dev, cpu_mask):
    # checkpointing replays the forward with the stashed generator state; the backward regenerates each mask from
    # the state the (replayed) forward saw, so gradients equal the un-checkpointed run's
    _, fused = _pair(0.2)
    fused = fused.to(dev)
    ckpt = copy.deepcopy(fused)
    fuse_lora(ckpt)
    enable_checkpointing(ckpt)
    out0, gin0, g0 = _run(fused)
    out1, gin1, g1 = _run(ckpt)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gin1, gin0, rtol=1e-6, atol=1e-7)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)


def _explicit(result, x, a, b, scaling, keep):
    xd = x * keep if keep is not None else x
    return result + scaling * (xd @ a.t()) @ b.t()


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_add_matches_explicit_mask(dev, p, cpu_mask, monkeypatch):
    # the mask the forward drew, materialised from the same generator state, gives the reference forward and
    # backward (odd sizes: 37 rows, in 23, out 29, rank 5); torch's dropout (CUDA's default draws in the kernels,
    # tested below)
    import llm2vec_fast.lora as lora_mod

    monkeypatch.setattr(lora_mod, "DROPOUT_KERNEL", "off")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 23, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
    w = torch.randn(29, 23, generator=g, dtype=torch.float64).to(dev)
    a = torch.randn(5, 23, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
    b = torch.randn(29, 5, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
    gy = torch.randn(37, 29, generator=g, dtype=torch.float64).to(dev)
    torch.manual_seed(11)
    state = torch.cuda.get_rng_state(x.device) if dev == "cuda" else torch.get_rng_state()
    keep = None
    if p > 0:
        xd, keep = _dropout(x.detach(), p)
        keep = (xd / x.detach()) if keep.dtype == torch.bool else keep  # the scaled 0 / (1 - p) factor
        frac = float((keep != 0).double().mean())
        assert abs(frac - (1 - p)) < 0.05, frac
    if dev == "cuda":
        torch.cuda.set_rng_state(state, x.device)
    else:
        torch.set_rng_state(state)
    y = lora_add(x @ w.t(), x, a, b, 1.5, p)
    y.backward(gy)
    got = (y.detach(), x.grad, a.grad, b.grad)
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y2 = _explicit(x2 @ w.t(), x2, a2, b2, 1.5, keep)
    y2.backward(gy)
    for mine, ref in zip(got, (y2.detach(), x2.grad, a2.grad, b2.grad), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-10)


def test_lora_add_gradcheck_with_dropout(cpu_mask):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, a, b):
        torch.manual_seed(0)  # one mask for every evaluation gradcheck makes
        return lora_add(x @ w.t(), x, a, b, 0.7, 0.3)

    assert torch.autograd.gradcheck(f, (x, a, b))


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_lora_autocast_bf16_close_to_peft(dev):
    # bf16 base, float32 adapter, bf16 autocast (the GPU recipe): both paths against a float64 oracle; the fused
    # path's error stays within twice peft's own
    peft_model, fused = _pair(0.0, dtype=torch.bfloat16)
    peft_model, fused = peft_model.to(dev), fused.to(dev)
    oracle, _ = _pair(0.0, dtype=torch.float64, fused=False)
    with torch.no_grad():
        for p, q in zip(oracle.parameters(), peft_model.parameters(), strict=True):
            p.copy_(q.double())  # the same bf16-rounded base weights, float32 adapters, in float64
    emb = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(4))
    out_ref, gin_ref, g_ref = _run(oracle, embeds=emb)
    with torch.autocast(dev, dtype=torch.bfloat16):
        out0, gin0, g0 = _run(peft_model, embeds=emb)
        out1, gin1, g1 = _run(fused, embeds=emb)

    def err(t, ref):
        return float((t.double().cpu() - ref).norm() / ref.norm())

    assert err(out1, out_ref) <= 2 * err(out0, out_ref) + 1e-3
    assert err(gin1, gin_ref) <= 2 * err(gin0, gin_ref) + 1e-3
    for k in g_ref:
        assert g1[k].dtype == torch.float32  # adapter gradients in the adapter's dtype
        assert err(g1[k], g_ref[k]) <= 2 * err(g0[k], g_ref[k]) + 1e-3, k


def _saved_bytes(model, dropout_seed=5):
    """Bytes autograd keeps for the backward of one forward, parameters excluded (each storage counted once)."""
    from llm2vec_fast.lora import kept_bytes

    model.train()
    torch.manual_seed(dropout_seed)
    ids = torch.randint(0, 100, (2, 16)).to(next(model.parameters()).device)
    return kept_bytes(lambda: model(input_ids=ids).last_hidden_state.sum(), model)


def test_fused_lora_dropout_keeps_nothing_extra(cpu_mask):
    # peft with dropout keeps, per adapted layer, the dropped-out input and the mask (noise); the fused layers keep
    # what peft keeps without dropout (x, shared by q/k/v and by gate/up, and the rank-r product), plus, on CPU by
    # default, a 1-byte mask per adapted layer's input element (2 blocks x 32 tokens x (6 x 64 + 96) elements)
    peft_drop, fused_drop = _pair(0.1)
    peft_nodrop, _ = _pair(0.0)
    no_drop = _saved_bytes(peft_nodrop)
    masks = 2 * 32 * (6 * 64 + 96) if cpu_mask == "kept" else 0
    assert _saved_bytes(fused_drop) == no_drop + masks
    assert _saved_bytes(peft_drop) > no_drop + 2 * 16 * (6 * 64 + 96) * 4 + masks  # at least one float copy per layer


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply():
    peft_model, fused = _pair(0.0)
    ids = torch.randint(0, 100, (1, 11))
    peft_model.eval()
    fused.eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).last_hidden_state
        with fused.disable_adapter():
            plain = fused(input_ids=ids).last_hidden_state
        with peft_model.disable_adapter():
            torch.testing.assert_close(plain, peft_model(input_ids=ids).last_hidden_state, rtol=0, atol=0)
        fused.merge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        fused.unmerge_adapter()
        torch.testing.assert_close(fused(input_ids=ids).last_hidden_state, ref, rtol=1e-5, atol=1e-6)


def test_fused_lora_dora_keeps_peft_forward():
    from peft import LoraConfig, get_peft_model

    base = _base()
    dora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    twin = fuse_lora(copy.deepcopy(dora))
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).last_hidden_state, dora(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_fuse_unfuse_pickle_and_deepcopy():
    _, fused = _pair(0.1)
    out = _run(fused)[0]
    clone = pickle.loads(pickle.dumps(fused))
    assert is_lora_fused(clone)
    torch.testing.assert_close(_run(clone)[0], out, rtol=0, atol=0)
    assert is_lora_fused(copy.deepcopy(fused))
    unfuse_lora(fused)
    assert not is_lora_fused(fused)
    torch.testing.assert_close(_run(fused)[0], out, rtol=1e-5, atol=1e-6)  # peft's forward, same draws


def test_lora_add_rejects_bad_input():
    x, r = torch.randn(4, 6), torch.randn(4, 5)
    with pytest.raises(ValueError, match="do not chain"):
        lora_add(r, x, torch.randn(3, 7), torch.randn(5, 3), 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        lora_add(r, x, torch.randn(3, 6), torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        lora_add(r, x, torch.randn(3, 6), torch.randn(5, 3), 1.0, 1.0)
    assert LoRAAddFunction is not None


def test_add_lora_fuses_by_default():
    assert is_lora_fused(add_lora(_base(), r=4))
    assert not is_lora_fused(add_lora(_base(), r=4, fused=False))


def _mlp_pair(dropout):
    """(fused ops + fused LoRA, the same with the activation outside the down projection), tiny Llama, Triton ops
    (interpreter on CPU)."""
    from llm2vec_fast import fuse_ops, to_bidirectional

    model = to_bidirectional(_base(), "torch")
    fuse_ops(model, ops=("gated_mlp",), backend="triton")
    peft_model, _ = _pair(dropout, fused=False)  # for its adapter weights
    model = add_lora(model, r=4, dropout=dropout)
    model.load_state_dict(peft_model.state_dict())
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("dev", [CPU_TRITON, pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gated_down_keeps_gate_and_up_only(dropout, dev, monkeypatch, cpu_mask):
    import llm2vec_fast.lora as lora_mod

    inside, outside = (m.to(dev) for m in _mlp_pair(dropout))
    real = lora_mod.lora_gated_down
    calls = []
    monkeypatch.setattr(lora_mod, "lora_gated_down", lambda *a: calls.append(1) or real(*a))
    out0, gin0, g0 = _run(inside)
    assert len(calls) == 2  # one per layer, taken
    monkeypatch.setattr(lora_mod, "lora_gated_down", lambda *a: None)
    out1, gin1, g1 = _run(outside)
    # the same dropout draws on the same h: equal to float32 rounding
    torch.testing.assert_close(out0, out1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gin0, gin1, rtol=1e-5, atol=1e-7)
    for k in g1:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)
    # h (intermediate 96 wide, float32) is no longer kept: 2 layers x 32 tokens x 96 x 4 bytes less
    without = _saved_bytes(outside)
    monkeypatch.setattr(lora_mod, "lora_gated_down", real)
    assert without - _saved_bytes(inside) == 2 * 32 * 96 * 4


@pytest.mark.triton_cpu
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gated_down_function_matches_explicit_formula(p, cpu_mask):
    # every gradient, the down weight and bias included (trainable here), against the formula with the mask the
    # forward drew (odd sizes: 37 rows, intermediate 23, out 29, rank 5)
    from llm2vec_fast.lora import GatedDownLoRAFunction

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(37, 23, generator=g).requires_grad_(True) for _ in range(2))
    w = torch.randn(29, 23, generator=g).requires_grad_(True)
    bias = torch.randn(29, generator=g).requires_grad_(True)
    a = torch.randn(5, 23, generator=g).requires_grad_(True)
    b = torch.randn(29, 5, generator=g).requires_grad_(True)
    gy = torch.randn(37, 29, generator=g)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    h_ref = torch.nn.functional.silu(gate.detach()) * up.detach()
    keep = _dropout(h_ref, p)[1] if p > 0 else None
    torch.set_rng_state(state)
    y = GatedDownLoRAFunction.apply(gate, up, w, bias, a, b, 1.5, p, "silu")
    y.backward(gy)
    mine = [y.detach()] + [t.grad for t in (gate, up, w, bias, a, b)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate, up, w, bias, a, b)]
    g2, u2, w2, bias2, a2, b2 = leaves
    h = torch.nn.functional.silu(g2) * u2
    y2 = _explicit(torch.nn.functional.linear(h, w2, bias2), h, a2, b2, 1.5, keep)
    y2.backward(gy)
    for name, m, r in zip(["y", "gate", "up", "w", "bias", "a", "b"], mine, [y2.detach()] + [t.grad for t in leaves],
                          strict=True):
        torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_lora_fp32_adapter_on_bf16_base_without_autocast():
    # peft casts x to the adapter's float32, adds in float32 and rounds to bf16 once: so does the fused layer
    peft_model, fused = _pair(0.0, dtype=torch.bfloat16)
    for m in (peft_model, fused):
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    emb = torch.randn(2, 13, 64, generator=torch.Generator().manual_seed(4))
    out0, gin0, g0 = _run(peft_model, embeds=emb)
    out1, gin1, g1 = _run(fused, embeds=emb)
    assert out1.dtype == torch.bfloat16
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gin1, gin0, rtol=2e-2, atol=1e-3)
    for k in g0:
        assert g1[k].dtype == torch.float32
        torch.testing.assert_close(g1[k], g0[k], rtol=2e-2, atol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------------------------------
# Norm outputs rebuilt in the backward: the fused LoRA layers reading an RMSNorm's output keep its input instead
# ---------------------------------------------------------------------------------------------------------------------
def _normed(backend, dropout=0.1, dtype=torch.float32):
    """Tiny Llama, fused RMSNorm (HF's forward on CPU under "auto", the Triton kernel under "triton"), fused LoRA."""
    from llm2vec_fast import fuse_ops

    peft_model, _ = _pair(dropout, dtype=dtype, fused=False)
    fuse_ops(peft_model, ops=("rms_norm",), backend=backend)
    return fuse_lora(peft_model)


@pytest.fixture
def no_rebuild(monkeypatch):
    import llm2vec_fast.lora as lora_mod

    return lambda: monkeypatch.setattr(lora_mod, "RECOMPUTE_NORM_OUTPUTS", False)


@pytest.mark.parametrize("backend,dev", [("auto", "cpu"), pytest.param("triton", "cpu", marks=pytest.mark.triton_cpu),
                                         pytest.param("auto", "cuda", marks=pytest.mark.gpu)])
def test_norm_outputs_are_rebuilt_bit_for_bit_and_not_kept(backend, dev, cpu_mask, no_rebuild, monkeypatch):
    import llm2vec_fast.fused as fused_mod

    model = _normed(backend).to(dev)
    fn = "_kernel_norm" if backend == "triton" or dev == "cuda" else "_hf_norm"
    real, calls = getattr(fused_mod, fn), []
    monkeypatch.setattr(fused_mod, fn, lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k))
    out0, gin0, g0 = _run(model)
    # forward: 2 norms per block and the final one; backward: one rebuild per block's norm, shared by q, k, v (and by
    # gate, up), without gradient tracking
    assert calls == [True] * 5 + [False] * 4
    rebuilt = _saved_bytes(model)
    no_rebuild()
    model.zero_grad(set_to_none=True)
    out1, gin1, g1 = _run(model)
    assert torch.equal(out0, out1) and torch.equal(gin0, gin1)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 2 * 7
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
    # 2 blocks x 2 norms x 32 tokens x 64 features x 4 bytes no longer kept, except the first block's first norm
    # (its input, the frozen embeddings' output, has no gradient, so only the adapters keep it: the same size)
    assert _saved_bytes(model) - rebuilt == 3 * 32 * 64 * 4


def test_norm_rebuild_under_autocast_and_partial_checkpointing(no_rebuild):
    # a checkpointed block keeps neither the norm output nor its input, an uncheckpointed one rebuilds
    model = _normed("auto")
    enable_checkpointing(model, 1)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(model)

    out0, gin0, g0 = run()
    no_rebuild()
    model.zero_grad(set_to_none=True)
    out1, gin1, g1 = run()
    assert torch.equal(out0, out1) and torch.equal(gin0, gin1)
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_norm_rebuild_tag_rules():
    from llm2vec_fast.lora import _recipe_of, tag_recomputable

    x = torch.randn(5, 6, requires_grad=True)
    y = tag_recomputable(x * 2, lambda t: t * 2, x)
    assert _recipe_of(y) is not None
    with torch.no_grad():
        untagged = tag_recomputable(x * 2, lambda t: t * 2, x)
        assert _recipe_of(y) is None and not hasattr(untagged, "_llm2vec_fast_rebuild")
    # changed in place after tagging: the adapter keeps y as it now is, and its gradient uses that value
    with torch.no_grad():
        y.mul_(3)
    assert _recipe_of(y) is None
    a, b = torch.randn(2, 6, requires_grad=True), torch.randn(4, 2)
    lora_add(torch.zeros(5, 4), y, a, b, 1.0).sum().backward()
    torch.testing.assert_close(a.grad, (torch.ones(5, 4) @ b).t() @ y.detach())


def test_norm_rebuild_input_changed_in_place_is_an_error():
    # the rebuild's inputs go through save_for_backward: autograd's version check catches an in-place change
    from llm2vec_fast.lora import tag_recomputable

    x = torch.randn(5, 6)
    w = torch.randn(6, requires_grad=True)
    y = tag_recomputable(x * w, lambda t, v: t * v, x, w)
    a = torch.randn(2, 6, requires_grad=True)
    loss = lora_add(torch.zeros(5, 4), y, a, torch.randn(4, 2), 1.0).sum()
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_norm_rebuild_replays_the_forwards_autocast(no_rebuild):
    # the backward runs outside autocast: the rebuild re-enters the state the tagged tensor was made under (here a
    # bf16 matmul; in float32 it would round differently)
    from llm2vec_fast.lora import tag_recomputable

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((5, 6), (6, 6), (4, 2)))
    a = torch.randn(2, 6, generator=g, requires_grad=True)

    def grad_a():
        a.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = tag_recomputable(x @ w, lambda t, v: t @ v, x, w)
            out = lora_add(torch.zeros(5, 4, dtype=torch.bfloat16), y, a, b, 1.0)
        out.float().sum().backward()
        return a.grad.clone()

    rebuilt = grad_a()
    no_rebuild()
    assert torch.equal(rebuilt, grad_a())


# ---------------------------------------------------------------------------------------------------------------------
# Dropout inside the rank-r product (llm2vec_fast.kernels.dropout_project, the default on CUDA): forced on the CPU
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def kernel_dropout(monkeypatch):
    import llm2vec_fast.lora as lora_mod

    monkeypatch.setattr(lora_mod, "DROPOUT_KERNEL", "triton")


@pytest.mark.parametrize("dev", [CPU_TRITON, pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_add_kernel_dropout_matches_explicit_mask(dev, p, kernel_dropout, monkeypatch):
    import llm2vec_fast.kernels.lora_project as lp

    monkeypatch.setattr(lp, "new_seed", lambda: 77)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 23, generator=g).to(dev).requires_grad_(True)
    w = torch.randn(29, 23, generator=g).to(dev)
    a = torch.randn(5, 23, generator=g).to(dev).requires_grad_(True)
    b = torch.randn(29, 5, generator=g).to(dev).requires_grad_(True)
    gy = torch.randn(37, 29, generator=g).to(dev)
    y = lora_add(x @ w.t(), x, a, b, 1.5, p)
    y.backward(gy)
    keep = lp.keep_mask(77, p, 37, 23, dev).float() / (1 - p) if p > 0 else None
    x2, a2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y2 = _explicit(x2 @ w.t(), x2, a2, b2, 1.5, keep)
    y2.backward(gy)
    for mine, ref in zip((y.detach(), x.grad, a.grad, b.grad), (y2.detach(), x2.grad, a2.grad, b2.grad), strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dev", [CPU_TRITON, pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_dropout_in_a_model_live_checkpointable_and_keeps_no_mask(dev, kernel_dropout):
    _, fused = _pair(0.2)
    fused = fused.to(dev)
    out_a, out_b = _run(fused, seed=1)[0], _run(fused, seed=2)[0]
    assert (out_a - out_b).abs().max() > 1e-3  # seeds from torch's CPU generator: a new draw each step
    fused.zero_grad(set_to_none=True)
    out0, gin0, g0 = _run(fused)
    # checkpointing replays the forward with the CPU generator restored: the same seeds, the same masks
    ckpt = copy.deepcopy(fused)
    fuse_lora(ckpt)
    enable_checkpointing(ckpt)
    ckpt.zero_grad(set_to_none=True)
    out1, gin1, g1 = _run(ckpt)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(gin1, gin0, rtol=1e-6, atol=1e-7)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
    # nothing kept beyond what the adapters keep without dropout: no mask, no dropped-out copy
    assert _saved_bytes(fused) == _saved_bytes(_pair(0.0)[1].to(dev))


@pytest.mark.parametrize("dev", [CPU_TRITON, pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gated_down_with_kernel_dropout_matches_unfused(dev, kernel_dropout, monkeypatch):
    import llm2vec_fast.lora as lora_mod

    inside, outside = (m.to(dev) for m in _mlp_pair(0.2))
    out0, gin0, g0 = _run(inside)
    monkeypatch.setattr(lora_mod, "lora_gated_down", lambda *a: None)
    out1, gin1, g1 = _run(outside)  # the same seeds in the same order: the same masks
    torch.testing.assert_close(out0, out1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gin0, gin1, rtol=1e-5, atol=1e-7)
    for k in g1:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-5, atol=1e-7, msg=k)


def test_kernel_dropout_leaves_float64_to_torch(kernel_dropout):
    # the kernels take fp32 / fp16 / bf16: a float64 layer keeps torch's dropout (gradcheck-able, as above)
    from llm2vec_fast.lora import _dropout_in_kernel

    x = torch.randn(3, 4, dtype=torch.float64)
    assert not _dropout_in_kernel(x, torch.randn(2, 4, dtype=torch.float64), torch.float64)
    assert _dropout_in_kernel(x.float(), torch.randn(2, 4), torch.float32)
    assert not _dropout_in_kernel(x.float(), torch.randn(129, 4), torch.float32)  # rank above the kernels' 128
