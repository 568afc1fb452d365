"""Tiny random Llama models and an in-test word-level tokenizer: the training tests need no download."""
import random

import pytest
import torch

N_WORDS = 240


def make_tokenizer():
    """Word-level tokenizer over ``w0 … w239`` plus ``_`` and the usual specials; prepends ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + ["_", ";", "."] + [f"w{i}" for i in range(N_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_model(vocab_size, seed=0, dropout=0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=256,
                      attention_dropout=dropout, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def sentences(n, seed=0, lo=4, hi=14):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random LlamaForCausalLM + tokenizer folder (loadable by path)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    """Blank-line separated documents of random words."""
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    docs = [" ".join(sentences(3, seed=i)) for i in range(60)]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_sentence_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sent") / "sentences.txt"
    path.write_text("\n".join(sentences(200, seed=7)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_pattern_file(tmp_path_factory):
    """Learnable text: every document counts upwards through the word list, so masked words are predictable."""
    path = tmp_path_factory.mktemp("pattern") / "count.txt"
    rng = random.Random(1)
    docs = []
    for _ in range(80):
        k = rng.randrange(N_WORDS)
        docs.append(" ".join(f"w{(k + j) % 16}" for j in range(rng.randint(8, 20))))
    path.write_text("\n".join(docs) + "\n")
    return str(path)


def poison_call(monkeypatch, cls, name, at=None, factor=float("nan")):
    """Make the ``at``-th call (1-based; None: every call) of method ``cls.name`` return its result times ``factor``
    (NaN by default): a non-finite loss injected into a training run."""
    real, calls = getattr(cls, name), []

    def poisoned(self, *a, **k):
        calls.append(1)
        out = real(self, *a, **k)
        return out * factor if at is None or len(calls) == at else out

    monkeypatch.setattr(cls, name, poisoned)
