"""MTEB drop-in: protocol-level checks without mteb, then a real offline mteb.evaluate on a local custom task."""
import os
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llm2vec_fast.mteb_wrapper import MTEBEncoder


class FakeEncoder:
    """Bag-of-words hashing encoder with the LLM2Vec.encode signature; records its inputs and kwargs."""

    def __init__(self, prompts=None):
        self.prompts = prompts or {}
        self.calls = []

    def encode(self, sentences, batch_size=32, show_progress_bar=True, convert_to_numpy=False, **kwargs):
        self.calls.append((list(sentences), dict(batch_size=batch_size, **kwargs)))
        out = np.zeros((len(sentences), 32), dtype=np.float32)
        for i, item in enumerate(sentences):
            for w in (item[1] if isinstance(item, list) else item).split():
                h = zlib.crc32(w.encode())
                # real-valued weights: integer counts give exactly tied cosines, whose ranks depend on rounding
                out[i, h % 32] += 1 + (h % 997) / 997
        return out


def _loader(texts, batch_size=2):
    """A DataLoader yielding mteb BatchedInput dicts {"text": [...]}."""
    rows = [{"text": t} for t in texts]
    return DataLoader(rows, batch_size=batch_size, collate_fn=lambda b: {"text": [r["text"] for r in b]})


META = SimpleNamespace(name="MyRetrieval", type="Retrieval", prompt=None)


def _enc(wrapper, texts, prompt_type=None, meta=META, **kw):
    return wrapper.encode(_loader(texts), task_metadata=meta, hf_split="test", hf_subset="default",
                          prompt_type=prompt_type, **kw)


def test_query_gets_instruction_document_does_not():
    fake = FakeEncoder(prompts={"query": "Given a question, retrieve passages"})
    w = MTEBEncoder(fake)
    q = _enc(w, ["what is a cat", "why", "who"], prompt_type="query")
    d = _enc(w, ["cats are animals", "the sky"], prompt_type="document")
    assert q.shape == (3, 32) and d.shape == (2, 32) and q.dtype == np.float32
    # written as LLM2Vec's MTEB runs write it (mteb's LLM2VecModel): a colon at the end
    assert fake.calls[0][0] == [["Given a question, retrieve passages:", t] for t in ["what is a cat", "why", "who"]]
    assert fake.calls[1][0] == ["cats are animals", "the sky"]


@pytest.mark.parametrize("given,written", [("Retrieve similar text.", "Retrieve similar text:"),
                                           ("Classify it:", "Classify it:"), ("..Odd..", "Odd:")])
def test_instructions_end_with_a_colon_as_llm2vec_mteb_runs_write_them(given, written):
    fake = FakeEncoder(prompts={"query": given})
    _enc(MTEBEncoder(fake), ["a"], prompt_type="query")
    _enc(MTEBEncoder(fake, llm2vec_instruction_format=False), ["a"], prompt_type="query")
    assert fake.calls[0][0] == [[written, "a"]] and fake.calls[1][0] == [[given, "a"]]
    mteb_models = pytest.importorskip("mteb.models.model_implementations.llm2vec_models")
    assert mteb_models.llm2vec_instruction(given) == written  # the same rule as mteb's own LLM2Vec wrapper


def test_prompt_priority_like_mteb():
    prompts = {"query": "P-query", "Retrieval": "P-type", "Retrieval-query": "P-type-query", "MyRetrieval": "P-task",
               "MyRetrieval-query": "P-task-query", "document": "P-doc"}
    w = MTEBEncoder(FakeEncoder(), prompts)
    assert w.get_instruction(META, "query") == "P-task-query"
    del prompts["MyRetrieval-query"]
    w = MTEBEncoder(FakeEncoder(), prompts)
    assert w.get_instruction(META, "query") == "P-task"
    assert w.get_instruction(SimpleNamespace(name="Other", type="Retrieval", prompt=None), "query") == "P-type-query"
    assert w.get_instruction(SimpleNamespace(name="Other", type="STS", prompt=None), "query") == "P-query"
    assert w.get_instruction(SimpleNamespace(name="Other", type="STS", prompt=None), "document") == "P-doc"
    assert w.get_instruction(SimpleNamespace(name="Other", type="STS", prompt=None), None) is None


def test_task_prompt_fallback_and_enum_prompt_type():
    meta = SimpleNamespace(name="T", type="Retrieval", prompt={"query": "Find docs", "document": "Doc instr"})
    w = MTEBEncoder(FakeEncoder())
    enum_query = SimpleNamespace(value="query")  # mteb passes PromptType enum members
    assert w.get_instruction(meta, enum_query) == "Find docs"
    assert w.get_instruction(meta, "document") is None  # LLM2Vec: documents without instruction
    assert w.get_instruction(SimpleNamespace(name="T", type="STS", prompt="Same meaning"), None) == "Same meaning"
    assert MTEBEncoder(FakeEncoder(), use_task_prompts=False).get_instruction(meta, "query") is None


def test_kwargs_batch_size_and_precision():
    fake = FakeEncoder()
    w = MTEBEncoder(fake, max_batch_tokens=999)
    out = _enc(w, ["a b", "c d e", "f"], batch_size=7, precision="ubinary", show_progress_bar=False)
    assert out.dtype == np.uint8 and out.shape == (3, 4)
    assert fake.calls[0][1]["batch_size"] == 7 and fake.calls[0][1]["max_batch_tokens"] == 999


def test_similarity_functions():
    w = MTEBEncoder(FakeEncoder())
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[1.0, 1.0], [3.0, 0.0], [0.0, -1.0]], dtype=np.float32)
    s = w.similarity(a, b)
    assert isinstance(s, torch.Tensor) and s.shape == (2, 3)
    torch.testing.assert_close(s, torch.tensor([[2**-0.5, 1.0, 0.0], [2**-0.5, 0.0, -1.0]]))
    p = w.similarity_pairwise(a, b[:2])
    torch.testing.assert_close(p, torch.tensor([2**-0.5, 0.0]))
    assert w.similarity(a[0], torch.from_numpy(b)).shape == (1, 3)
    with pytest.raises(ValueError, match="equal shapes"):
        w.similarity_pairwise(a, b)


def test_bad_inputs():
    w = MTEBEncoder(FakeEncoder())
    with pytest.raises(ValueError, match="dict with a 'text' list"):
        w.encode([["a"]], task_metadata=META, hf_split="test", hf_subset="default")
    with pytest.raises(TypeError, match="input 1 must be a string"):
        w.encode([{"text": ["a", 3]}], task_metadata=META, hf_split="test", hf_subset="default")
    with pytest.raises(ValueError, match="organization/model"):
        MTEBEncoder(FakeEncoder(), model_name="noslash")
    with pytest.raises(TypeError, match="prompts must map str to str"):
        MTEBEncoder(FakeEncoder(), prompts={"query": 3})


# ---------------------------------------------------------------------- with mteb installed
@pytest.fixture(scope="module")
def mteb():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return pytest.importorskip("mteb")


def test_follows_mteb_encoder_protocol(mteb):
    from mteb.models.models_protocols import EncoderProtocol

    w = MTEBEncoder(FakeEncoder(), model_name="local/fake")
    assert isinstance(w, EncoderProtocol)
    meta = w.mteb_model_meta
    assert meta.name == "local/fake" and meta.similarity_fn_name.value == "cosine" and meta.use_instructions


def test_mteb_evaluate_local_sts_task(mteb, data_dir):
    """A real mteb run, offline: a custom STS task on 40 SICK trial pairs; mteb's score equals ours."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from llm2vec_fast import evaluation as ev

    s1, s2, gold = ev.load_sts(data_dir / "sick" / "SICK_trial.txt")
    s1, s2, gold = s1[:40], s2[:40], gold[:40]

    class LocalSICK(AbsTaskSTS):
        min_score, max_score = 1, 5
        metadata = TaskMetadata(
            name="LocalSICKTrial", dataset={"path": "local/sick-trial", "revision": "local"}, description="SICK trial",
            type="STS", category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
            main_score="cosine_spearman", bibtex_citation="", prompt="Retrieve semantically similar text")

        def load_data(self, num_proc=None, **kwargs):
            data = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": gold.tolist()})
            self.dataset = {"default": DatasetDict({"test": data})}
            self.data_loaded = True

    fake = FakeEncoder()
    res = mteb.evaluate(MTEBEncoder(fake, model_name="local/fake"), [LocalSICK()], cache=None,
                        show_progress_bar=False)
    assert not res.exceptions
    score = res.task_results[0].get_score()
    assert all(item[0] == "Retrieve semantically similar text:" for call in fake.calls for item in call[0])
    ours = ev.sts_scores(FakeEncoder().encode(s1), FakeEncoder().encode(s2), gold)
    assert score == pytest.approx(ours["cosine_spearman"], abs=1e-6)


# ---------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_model_query_matches_llm2vec_encode():
    from .real_model_eval import default_model

    l2v = default_model()
    w = MTEBEncoder(l2v, prompts={"query": "Given a web search query, retrieve relevant passages"})
    texts = ["how do cats purr", "capital of France"]
    q = _enc(w, texts, prompt_type="query")
    d = _enc(w, ["Cats purr by vibrating their larynx."], prompt_type="document")
    ref_q = l2v.encode([["Given a web search query, retrieve relevant passages:", t] for t in texts],
                       show_progress_bar=False, convert_to_numpy=True)
    ref_d = l2v.encode(["Cats purr by vibrating their larynx."], show_progress_bar=False, convert_to_numpy=True)
    np.testing.assert_allclose(q, ref_q, atol=1e-5)
    np.testing.assert_allclose(d, ref_d, atol=1e-5)
    assert w.similarity(q, d).shape == (2, 1)
