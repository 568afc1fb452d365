"""sentence-transformers drop-in: a saved folder loads in SentenceTransformer and embeds exactly as LLM2Vec.encode."""
import json

import numpy as np
import pytest

from llm2vec_fast import LLM2Vec
from llm2vec_fast.st_export import MODULE_CLASS, is_st_folder, load_st_folder, save_sentence_transformers

INSTR = "Given a web search query, retrieve relevant passages that answer the query"
TEXTS = ["A man is playing a guitar.", "Cats purr.", "", "   ",
         "The quick brown fox jumps over the lazy dog near the river bank, twice.", "Orange",
         "a text that ends with the end string </s>"]  # eos_token pooling still appends one, as encode does


def _cos(a, b):
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(na * nb, 1e-30))


def _check_same(st_emb, ref):
    assert st_emb.shape == ref.shape
    assert _cos(st_emb, ref).min() >= 0.99999
    np.testing.assert_allclose(st_emb, ref, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def sentence_transformers():
    return pytest.importorskip("sentence_transformers")


def _load(path, pooling_mode="mean"):
    return LLM2Vec.from_pretrained(str(path), device="cpu", dtype="float32", pooling_mode=pooling_mode)


def test_folder_layout_without_sentence_transformers(tiny_encoder_dir, tmp_path):
    l2v = _load(tiny_encoder_dir)
    out = save_sentence_transformers(l2v, tmp_path / "st", prompts={"query": INSTR, "document": ""})
    assert json.loads((out / "modules.json").read_text()) == [{"idx": 0, "name": "0", "path": "",
                                                               "type": MODULE_CLASS}]
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": INSTR, "document": ""} and cfg["similarity_fn_name"] == "cosine"
    assert is_st_folder(out) and not is_st_folder(tiny_encoder_dir)
    folder, l2v_cfg = load_st_folder(out)
    assert folder == str(out) and l2v_cfg["pooling_mode"] == "mean" and l2v_cfg["prompts"]["query"] == INSTR
    assert l2v.prompts == {}  # the caller's model is left as it was
    with pytest.raises(ValueError, match="not a folder written by save_sentence_transformers"):
        load_st_folder(tiny_encoder_dir)


def test_save_argument_errors(tiny_encoder_dir, tmp_path):
    l2v = _load(tiny_encoder_dir)
    with pytest.raises(TypeError, match="prompts must map str to str"):
        save_sentence_transformers(l2v, tmp_path / "a", prompts={"query": None})
    with pytest.raises(ValueError, match="default_prompt_name 'doc' is not one of the prompts"):
        save_sentence_transformers(l2v, tmp_path / "b", prompts={"query": INSTR}, default_prompt_name="doc")


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos_token"])
def test_sentence_transformer_matches_encode(sentence_transformers, tiny_encoder_dir, tmp_path, pooling_mode):
    l2v = _load(tiny_encoder_dir, pooling_mode)
    path = save_sentence_transformers(l2v, tmp_path / "st", prompts={"query": INSTR})
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    assert st.get_embedding_dimension() == l2v.model.config.hidden_size
    ref = l2v.encode(TEXTS, show_progress_bar=False, convert_to_numpy=True)
    _check_same(st.encode(TEXTS, convert_to_numpy=True, batch_size=4), ref)
    ref_q = l2v.encode([[INSTR, t] for t in TEXTS], show_progress_bar=False, convert_to_numpy=True)
    _check_same(st.encode(TEXTS, prompt_name="query", convert_to_numpy=True), ref_q)
    _check_same(st.encode(TEXTS, prompt=INSTR, convert_to_numpy=True), ref_q)
    _check_same(st.encode_query(TEXTS, convert_to_numpy=True), ref_q)
    assert np.abs(ref_q - ref).max() > 1e-3  # the instruction is attended to: the test can tell them apart


def test_token_embeddings_match_encode(sentence_transformers, tiny_encoder_dir, tmp_path):
    l2v = _load(tiny_encoder_dir)
    path = save_sentence_transformers(l2v, tmp_path / "st", prompts={"query": INSTR})
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    texts = [t for t in TEXTS if t.strip()]
    for kw, items in ((dict(), texts), (dict(prompt_name="query"), [[INSTR, t] for t in texts])):
        ours = l2v.encode(items, output_value="token_embeddings", show_progress_bar=False)
        theirs = st.encode(texts, output_value="token_embeddings", batch_size=3, **kw)
        assert [len(t) for t in theirs] == [len(t) for t in ours]
        for a, b in zip(theirs, ours, strict=True):
            np.testing.assert_allclose(np.asarray(a.cpu()), b.numpy(), atol=1e-5, rtol=1e-4)


def test_bidirectional_is_kept(sentence_transformers, tiny_encoder_dir, tmp_path):
    l2v = _load(tiny_encoder_dir)
    st = sentence_transformers.SentenceTransformer(str(save_sentence_transformers(l2v, tmp_path / "st")),
                                                   trust_remote_code=True, device="cpu")
    causal = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype="float32",
                                     enable_bidirectional=False)
    texts = ["first sentence here", "another one, longer than the first"]
    ours = st.encode(texts, convert_to_numpy=True)
    assert np.abs(ours - causal.encode(texts, show_progress_bar=False, convert_to_numpy=True)).max() > 1e-3


def test_reload_with_llm2vec_and_st_save_round_trip(sentence_transformers, tiny_encoder_dir, tmp_path):
    l2v = _load(tiny_encoder_dir, "weighted_mean")
    path = save_sentence_transformers(l2v, tmp_path / "st", prompts={"query": INSTR})
    back = LLM2Vec.from_pretrained(str(path), device="cpu", dtype="float32")
    assert back.pooling_mode == "weighted_mean" and back.prompts == {"query": INSTR}
    ref = l2v.encode(TEXTS, show_progress_bar=False, convert_to_numpy=True)
    _check_same(back.encode(TEXTS, show_progress_bar=False, convert_to_numpy=True), ref)
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    st.save(str(tmp_path / "again"))
    st2 = sentence_transformers.SentenceTransformer(str(tmp_path / "again"), trust_remote_code=True, device="cpu")
    _check_same(st2.encode(TEXTS, convert_to_numpy=True), ref)


def test_dtype_auto_loads_the_checkpoints_dtype(sentence_transformers, tiny_encoder_dir, tmp_path):
    import torch

    l2v = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype="bfloat16")
    path = str(save_sentence_transformers(l2v, tmp_path / "st"))
    auto = sentence_transformers.SentenceTransformer(path, trust_remote_code=True, device="cpu",
                                                     model_kwargs={"torch_dtype": "auto"})
    assert next(auto.parameters()).dtype == torch.bfloat16
    plain = sentence_transformers.SentenceTransformer(path, trust_remote_code=True, device="cpu")
    assert next(plain.parameters()).dtype == torch.float32  # sentence-transformers' own default


def test_sentence_transformer_pickled_into_a_fresh_process(sentence_transformers, tiny_encoder_dir, tmp_path):
    """What sentence-transformers' multi-process pool does: the model is pickled to workers whose transformers has
    not registered llm2vec_fast's attention yet."""
    import pickle
    import subprocess
    import sys

    path = save_sentence_transformers(_load(tiny_encoder_dir), tmp_path / "st")
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    ref = st.encode(TEXTS, convert_to_numpy=True)
    (tmp_path / "st.pkl").write_bytes(pickle.dumps(st))
    code = ("import pickle, sys, numpy; st = pickle.load(open(sys.argv[1], 'rb')); "
            "numpy.save(sys.argv[2], st.encode(sys.argv[3:], convert_to_numpy=True))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "st.pkl"), str(tmp_path / "out.npy"), *TEXTS],
                   check=True, capture_output=True, timeout=300)
    _check_same(np.load(tmp_path / "out.npy"), ref)


def test_untrusted_load_is_refused_clearly(sentence_transformers, tiny_encoder_dir, tmp_path):
    path = save_sentence_transformers(_load(tiny_encoder_dir), tmp_path / "st")
    with pytest.raises(ValueError, match="trust_remote_code"):
        sentence_transformers.SentenceTransformer(str(path), device="cpu")


@pytest.mark.slow
def test_default_model_sentence_transformer_parity(sentence_transformers, data_dir, tmp_path):
    """The real SmolLM2-135M in fp32: texts and [instruction, text] pairs, cosine >= 0.99999 with LLM2Vec.encode."""
    from llm2vec_fast import evaluation as ev

    from .real_model_eval import default_model

    l2v = default_model()
    s1, s2, _ = ev.load_sts(data_dir / "stsb" / "sts-dev.csv")
    texts = s1[:3] + s2[:3] + TEXTS
    path = save_sentence_transformers(l2v, tmp_path / "st", prompts={"query": INSTR})
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    ref = l2v.encode(texts, show_progress_bar=False, convert_to_numpy=True)
    _check_same(st.encode(texts, convert_to_numpy=True), ref)
    ref_q = l2v.encode([[INSTR, t] for t in texts], show_progress_bar=False, convert_to_numpy=True)
    _check_same(st.encode_query(texts, convert_to_numpy=True), ref_q)


def test_export_cli(sentence_transformers, tiny_encoder_dir, tmp_path, capsys):
    import argparse

    from llm2vec_fast import st_export

    p = argparse.ArgumentParser()
    st_export.add_subcommands(p.add_subparsers(dest="command"))
    out = tmp_path / "exported"
    args = p.parse_args(["export-st", "--model", str(tiny_encoder_dir), "--output", str(out), "--pooling",
                         "eos_token", "--query-prompt", INSTR])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().split("\n")[-1] == str(out)
    st = sentence_transformers.SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    ref = _load(tiny_encoder_dir, "eos_token")
    _check_same(st.encode_query(TEXTS[:2], convert_to_numpy=True),
                ref.encode([[INSTR, t] for t in TEXTS[:2]], show_progress_bar=False, convert_to_numpy=True))


def test_prompts_edited_in_sentence_transformers_are_what_llm2vec_loads(sentence_transformers, tiny_encoder_dir,
                                                                         tmp_path):
    path = save_sentence_transformers(_load(tiny_encoder_dir), tmp_path / "st", prompts={"query": INSTR})
    st = sentence_transformers.SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
    st.prompts["extra"] = "E:"
    del st.prompts["query"]
    st.save(str(tmp_path / "resaved"))
    loaded = LLM2Vec.from_pretrained(str(tmp_path / "resaved"), device="cpu").prompts
    assert loaded == dict(st.prompts) and loaded["extra"] == "E:" and "query" not in loaded


def test_the_newer_settings_file_wins_a_key_both_hold(tiny_encoder_dir, tmp_path):
    import os

    l2v = _load(tiny_encoder_dir)
    l2v.prompts = {"query": "old"}
    l2v.save(tmp_path / "m")
    # an earlier version re-saves the folder: every key in llm2vec_config.json, the other file left stale
    cfg = json.loads((tmp_path / "m" / "llm2vec_config.json").read_text())
    (tmp_path / "m" / "llm2vec_config.json").write_text(json.dumps({**cfg, "prompts": {"query": "NEW"},
                                                                     "bidirectional": True}))
    stale = tmp_path / "m" / "llm2vec_fast_config.json"
    os.utime(stale, (stale.stat().st_atime, stale.stat().st_mtime - 60))
    assert LLM2Vec.from_pretrained(str(tmp_path / "m"), device="cpu").prompts == {"query": "NEW"}
