"""Evaluation during training (llm2vec_fast.training.monitor): scores at the right steps, held-out MNTP metrics equal
an independent full-logits computation, evaluation leaves the training unchanged, the best folder is the best step's
model and loads, load-best-at-end, early stopping, resume, argument checks and the CLI."""
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive
from llm2vec_fast.training.mntp import MaskedValidation, MNTPArguments, train_mntp

from .conftest import make_model, make_tokenizer, poison_call, sentences


@pytest.fixture(scope="module")
def sts_file(tmp_path_factory):
    """An STS-B-layout file (no header; genre, file, year, id, score, s1, s2) over the tiny tokenizer's words."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("sts") / "sts-dev.csv"
    rows = [f"g\tf\t2012\t{i:04d}\t{rng.uniform(0, 5):.2f}\t{a}\t{b}"
            for i, (a, b) in enumerate(zip(sentences(30, seed=11), sentences(30, seed=12), strict=True))]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "valid.txt"
    path.write_text("\n\n".join(" ".join(sentences(3, seed=500 + i)) for i in range(12)) + "\n")
    return str(path)


def _mntp(model_dir, text_file, out, **kw):
    base = dict(train_files=[text_file], output_dir=str(out), model=model_dir, max_seq_length=32, batch_size=4,
                max_steps=6, logging_steps=1, save_steps=2, learning_rate=1e-2, disable_tqdm=True, seed=3)
    base.update(kw)
    return MNTPArguments(**base)


def scripted(values):
    """A Python-API evaluator that returns ``values`` in turn (as ``eval_score``), to steer best / early stopping."""
    it = iter(values)

    def score(encoder):
        return {"score": next(it)}
    return score


def dicts(values):
    """A Python-API evaluator that returns the dicts of ``values`` in turn."""
    it = iter(values)

    def score(encoder):
        return next(it)
    return score


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_masked_validation_equals_full_logits():
    """Held-out loss / accuracy / perplexity against the original path (full-vocabulary logits at every position,
    shifted), on fixed masks: the same on every call, and drawn without touching the global random stream."""
    from llm2vec_fast import to_bidirectional
    from llm2vec_fast.training.data import MNTPCollator
    from llm2vec_fast.training.mntp import MNTPModel

    tok = make_tokenizer()
    lm = make_model(len(tok), seed=5)
    to_bidirectional(lm, "torch")
    model = MNTPModel(lm.get_decoder(), lm.get_output_embeddings()).eval()
    blocks = torch.randint(7, len(tok), (5, 19))
    blocks[:, 0] = tok.bos_token_id
    state = torch.random.get_rng_state()
    val = MaskedValidation(blocks, MNTPCollator.recipe("llama", tok, tok.convert_tokens_to_ids("_")), seed=1,
                           batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert (val.labels != -100).any()
    with torch.no_grad():
        got = val(model)
        again = val(model)
        logits = lm(input_ids=val.input_ids).logits.float()
    targets = val.labels[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    keep = targets != -100
    want_loss = F.cross_entropy(flat[keep], targets[keep]).item()
    want_acc = (flat[keep].argmax(-1) == targets[keep]).double().mean().item()
    assert got == again
    assert got["eval_loss"] == pytest.approx(want_loss, rel=1e-5)
    assert got["eval_accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert got["eval_perplexity"] == pytest.approx(torch.tensor(want_loss).exp().item(), rel=1e-5)


def test_mntp_evaluates_without_changing_the_training(tiny_model_dir, tiny_text_file, held_out_file, sts_file,
                                                      tmp_path):
    """Scores at eval_on_start, every eval_steps and the last step, in the result, the Trainer's log and the
    training record; the loss curve and the adapter equal a run without evaluation; best/ holds the best step's
    adapter (the checkpoint of that step) and loads as an MNTP output does."""
    from llm2vec_fast import LLM2Vec

    plain = train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "plain"))
    out = tmp_path / "eval"
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, validation_files=[held_out_file], eval_sts=sts_file,
                         eval_steps=2, eval_on_start=True))
    assert [e["step"] for e in r["evaluations"]] == [0, 2, 4, 6]
    for e in r["evaluations"]:
        assert {"eval_loss", "eval_accuracy", "eval_perplexity", "eval_sts_spearman"} <= e.keys()
        assert 0 < e["eval_loss"] < 20 and 0 <= e["eval_accuracy"] <= 1 and -1 <= e["eval_sts_spearman"] <= 1
    assert [x["loss"] for x in r["losses"]] == [x["loss"] for x in plain["losses"]]
    assert _same(_adapter(out), _adapter(tmp_path / "plain"))

    best = r["best"]
    losses = {e["step"]: e["eval_loss"] for e in r["evaluations"]}
    assert best["metric"] == "eval_loss" and best["value"] == min(losses.values())
    assert best["step"] == min(losses, key=losses.get) and r["loaded_best"] is False
    want = _adapter(out / f"checkpoint-{best['step']}") if best["step"] else None
    if want is not None:
        assert _same(_adapter(out / "best"), want)
    record = json.loads((out / "best" / "llm2vec_training.json").read_text())
    assert record["best"]["step"] == best["step"]
    final = json.loads((out / "llm2vec_training.json").read_text())
    assert final["evaluations"] == r["evaluations"] and final["best"] == best
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_loss" in h] == [0, 2, 4]
    texts = sentences(3, seed=9)
    e1 = LLM2Vec.from_pretrained(str(out / "best"), device="cpu").encode(texts, show_progress_bar=False)
    e2 = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out / "best"),
                                 device="cpu").encode(texts, show_progress_bar=False)
    torch.testing.assert_close(e1, e2, rtol=1e-4, atol=1e-5)


def test_validation_split_holds_out_the_first_documents(tiny_model_dir, tiny_text_file, tmp_path):
    from llm2vec_fast.training.data import read_documents
    from llm2vec_fast.training.mntp import build_mntp

    args = _mntp(tiny_model_dir, tiny_text_file, tmp_path, validation_split_percentage=10)
    model, tok, dataset, _, _ = build_mntp(args)
    docs = read_documents(tiny_text_file)
    k = 6  # ceil(10 % of 60 documents)
    ids = [t for d in docs[k:] for t in tok(d)["input_ids"]]
    assert dataset.blocks.reshape(-1).tolist() == ids[:dataset.blocks.numel()]
    held = [t for d in docs[:k] for t in tok(d)["input_ids"]]
    assert len(model.validation) == len(held) // 32


def test_load_best_at_end_and_early_stopping(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "best-at-end"
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, evaluators=[scripted([0.2, 0.9, 0.5])],
                         eval_steps=2, load_best_at_end=True))
    assert r["best"]["metric"] == "eval_score" and r["best"]["step"] == 4 and r["loaded_best"] is True
    assert r["global_step"] == 6 and r["stopped_early_at"] is None
    assert _same(_adapter(out), _adapter(out / "checkpoint-4")) and _same(_adapter(out / "best"), _adapter(out))
    assert not _same(_adapter(out), _adapter(out / "checkpoint-6"))

    out = tmp_path / "early"
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=10, evaluators=[scripted([0.9, 0.5, 0.4])],
                         eval_steps=2, early_stopping_patience=2))
    assert r["stopped_early_at"] == 6 and r["global_step"] == 6 and r["best"]["step"] == 2
    assert [e["step"] for e in r["evaluations"]] == [2, 4, 6]
    # a lower-is-better metric picks the smallest value
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "low", evaluators=[dicts(
        [{"x_loss": 3.0, "score": 0.0}, {"x_loss": 1.0, "score": 0.0}, {"x_loss": 2.0, "score": 0.0}])],
        eval_steps=2, best_metric="eval_x_loss"))
    assert r["best"]["step"] == 4


def test_scripted_dict_evaluator_names():
    # the helper above returns whole dicts: keys get the eval_ prefix once
    from llm2vec_fast.training.monitor import _prefixed

    assert _prefixed(dicts([{"a": 1, "eval_b": 2}]))(None) == {"eval_a": 1.0, "eval_b": 2.0}
    with pytest.raises(TypeError, match="not a number"):
        _prefixed(dicts([{"a": "high"}]))(None)
    with pytest.raises(TypeError, match="non-empty dict"):
        _prefixed(dicts([0.5]))(None)


def _resume(ctx, values, scores, kept, resumed_scores):
    """A full run scored with ``values``; then a run resumed from its ``kept`` folders (a checkpoint and best/),
    scored with ``resumed_scores``. Returns (the full run's folder, the resumed folder, the resumed result)."""
    model_dir, text_file, tmp = ctx
    full, resumed = tmp / f"full-{values}", tmp / f"resumed-{values}"
    train_mntp(_mntp(model_dir, text_file, full, evaluators=[scripted(scores)], eval_steps=2))
    resumed.mkdir()
    for name in kept:
        shutil.copytree(full / name, resumed / name)
    r = train_mntp(_mntp(model_dir, text_file, resumed, evaluators=[scripted(resumed_scores)], eval_steps=2,
                         resume_from_checkpoint=True))
    return full, resumed, r


def test_resume_keeps_or_sets_aside_the_best_folder(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    ctx = (tiny_model_dir, tiny_text_file, tmp_path)
    # resumed after step 4, the best folder (step 2) is kept: a later, worse score does not replace it
    full, resumed, r = _resume(ctx, "falling", [0.9, 0.5, 0.4], ("checkpoint-4", "best"), [0.1])
    assert [e["step"] for e in r["evaluations"]] == [2, 4, 6] and r["best"]["step"] == 2
    assert _same(_adapter(resumed / "best"), _adapter(full / "best"))
    # a best folder from after the checkpoint (step 6 here) belongs to a run that went on: it is moved aside (not
    # deleted), and best/ is rebuilt from the best evaluation up to the checkpoint (step 2, from checkpoint-2),
    # which the resumed run's worse scores do not replace
    with caplog.at_level("WARNING"):
        full, resumed, r = _resume(ctx, "rising", [0.1, 0.2, 0.3], ("checkpoint-2", "best"), [0.05, 0.01])
    assert "it holds step 6, after the checkpoint resumed from (step 2)" in caplog.text
    aside = resumed / "best.set-aside-1"
    assert _same(_adapter(aside), _adapter(full / "best"))
    assert json.loads((aside / "llm2vec_training.json").read_text())["best"]["step"] == 6
    assert r["best"]["step"] == 2 and r["best"]["value"] == 0.1
    assert _same(_adapter(resumed / "best"), _adapter(full / "checkpoint-2"))
    assert not _same(_adapter(resumed / "best"), _adapter(resumed))  # the resumed weights were put back
    assert _same(_adapter(resumed), _adapter(full))  # and trained on as in the full run


@pytest.mark.parametrize("truncate", [None, 8], ids=["full", "truncate-dim-8"])
def test_simcse_scores_match_the_saved_best_adapter(tiny_model_dir, tiny_sentence_file, sts_file, tmp_path, truncate):
    """The Spearman logged during training equals evaluate_sts on the saved best adapter, loaded afresh (also at
    eval_truncate_dim); SimCSE's attention dropout is off while scoring (two evaluations of one model agree)."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.evaluation import evaluate_sts

    out = tmp_path / "simcse"
    r = train_contrastive(ContrastiveArguments(
        mode="simcse", train_files=[tiny_sentence_file], output_dir=str(out), model=tiny_model_dir, batch_size=6,
        max_steps=4, logging_steps=1, save_steps=0, learning_rate=1e-3, disable_tqdm=True, max_length=32,
        eval_sts=sts_file, eval_steps=2, eval_on_start=True, attention_dropout=0.3, eval_truncate_dim=truncate))
    assert [e["step"] for e in r["evaluations"]] == [0, 2, 4]
    best = r["best"]
    assert best["metric"] == "eval_sts_spearman"
    assert best["value"] == max(e["eval_sts_spearman"] for e in r["evaluations"])
    loaded = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out / "best"), device="cpu")
    assert evaluate_sts(loaded, sts_file, truncate_dim=truncate)["scores"]["validation"][0]["main_score"] == \
        pytest.approx(best["value"], abs=1e-6)


def test_reranking_score_during_training_matches_the_saved_best_adapter(tiny_model_dir, tiny_sentence_file,
                                                                       tmp_path):
    """eval_reranking logs MAP (eval_reranking_map, the default best metric when it is the only score); the best
    value equals evaluate_reranking on the saved best adapter; the CLI flags reach the arguments."""
    import argparse

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.evaluation import evaluate_reranking
    from llm2vec_fast.training.cli import _eval_kwargs, add_subcommands

    lines = Path(tiny_sentence_file).read_text().split("\n")
    rerank = tmp_path / "rr.csv"
    rows = ["split,query,positive,negative"] + [f"{'dev' if i % 4 else 'test'},{lines[i]},{lines[i + 1]},{lines[i + 2]}"
                                                 for i in range(0, 60, 3)]
    rerank.write_text("\n".join(rows) + "\n")
    out = tmp_path / "simcse"
    kw = dict(eval_reranking=str(rerank), eval_reranking_split="dev", eval_reranking_limit=10,
              eval_reranking_instruction="Find the next sentence")
    r = train_contrastive(ContrastiveArguments(
        mode="simcse", train_files=[tiny_sentence_file], output_dir=str(out), model=tiny_model_dir, batch_size=6,
        max_steps=4, logging_steps=1, save_steps=0, learning_rate=1e-3, disable_tqdm=True, max_length=32,
        eval_steps=2, eval_on_start=True, **kw))
    assert [e["step"] for e in r["evaluations"]] == [0, 2, 4]
    assert r["best"]["metric"] == "eval_reranking_map"
    loaded = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out / "best"), device="cpu")
    again = evaluate_reranking(loaded, rerank, split="dev", limit=10, instruction="Find the next sentence")
    assert again["llm2vec_fast"]["n_queries"] == 10
    assert again["scores"]["validation"][0]["main_score"] == pytest.approx(r["best"]["value"], abs=1e-6)
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["train", "simcse", "--train-file", "x", "--output-dir", "o", "--eval-reranking",
                           str(rerank), "--eval-reranking-split", "dev", "--eval-reranking-limit", "10",
                           "--eval-reranking-instruction", "Find the next sentence"])
    assert {k: v for k, v in _eval_kwargs(a).items() if k.startswith("eval_reranking")} == kw
    with pytest.raises(ValueError, match="eval_reranking_split given without eval_reranking"):
        ContrastiveArguments(mode="simcse", train_files=["x"], output_dir=str(tmp_path), eval_sts=str(rerank),
                             eval_reranking_split="dev")
    with pytest.raises(FileNotFoundError, match="eval_reranking: reranking data file"):
        ContrastiveArguments(mode="simcse", train_files=["x"], output_dir=str(tmp_path),
                             eval_reranking=str(tmp_path / "missing.jsonl"))
    only_pos = tmp_path / "pos.jsonl"
    only_pos.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(ValueError, match="no query of .* has both a relevant and an irrelevant text"):
        train_contrastive(ContrastiveArguments(
            mode="simcse", train_files=[tiny_sentence_file], output_dir=str(tmp_path / "o"), model=tiny_model_dir,
            max_steps=1, eval_reranking=str(only_pos)))


def test_arguments_are_checked_before_training(tiny_model_dir, tiny_text_file, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, load_best_at_end=True)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        ContrastiveArguments(mode="simcse", train_files=["x"], output_dir=str(tmp_path), early_stopping_patience=2)
    with pytest.raises(FileNotFoundError, match="eval_sts"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(tmp_path / "missing.tsv"))
    with pytest.raises(ValueError, match="eval_steps must be"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, evaluators=[scripted([1])], eval_steps=0)
    with pytest.raises(ValueError, match="validation_split_percentage"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, validation_split_percentage=100)
    with pytest.raises(ValueError, match="not both"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, validation_split_percentage=5, validation_files=["v.txt"])
    with pytest.raises(TypeError, match="callables"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, evaluators=["sts"])
    sts, one_pair = tmp_path / "sts.csv", tmp_path / "one.csv"
    sts.write_text("g\tf\t2012\t1\t1.0\tw1 w2\tw3\ng\tf\t2012\t2\t2.0\tw4\tw5 w6\n")
    one_pair.write_text("g\tf\t2012\t1\t1.0\tw1 w2\tw3\n")
    bad = tmp_path / "bad-sts.csv"
    bad.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="columns"):  # read before the model loads
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "o", eval_sts=str(bad)))
    with pytest.raises(ValueError, match="eval_sts_limit must be >= 2"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(sts), eval_sts_limit=1)
    with pytest.raises(ValueError, match="eval_sts_limit given without eval_sts"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, evaluators=[scripted([1])], eval_sts_limit=5)
    with pytest.raises(ValueError, match="eval_retrieval_max_docs given without eval_retrieval"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(sts), eval_retrieval_max_docs=5)
    with pytest.raises(ValueError, match="max_eval_blocks given without validation"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(sts), max_eval_blocks=5)
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("\n")
    short.write_text("w1 w2 w3\n")
    with pytest.raises(ValueError, match="hold no text"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "e", validation_files=[str(empty)]))
    with pytest.raises(ValueError, match=r"validation_files .*short.txt.*fewer than one block of 32; give more "
                                         r"held-out text"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "s", validation_files=[str(short)]))
    with pytest.raises(ValueError, match="has 1 sentence pair"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "one", eval_sts=str(one_pair)))
    with pytest.raises(ValueError, match=r"best_metric 'eval_loss' is not among this run's metrics "
                                         r"\['eval_sts_spearman'\]"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(sts), best_metric="loss")
    assert _mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=str(sts),
                 best_metric="sts_spearman").best_metric == "eval_sts_spearman"
    with pytest.raises(ValueError, match="best_metric 'eval_nope'"):  # a custom evaluator's names: known when run
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "o2", evaluators=[scripted([1.0])],
                         best_metric="eval_nope", max_steps=2))


def test_cli_reports_the_best_step(tiny_model_dir, tiny_text_file, sts_file, tmp_path, capsys):
    import argparse

    from llm2vec_fast.training.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["train", "mntp", "--model", tiny_model_dir, "--train-file", tiny_text_file,
                           "--output-dir", str(tmp_path), "--max-seq-length", "32", "--batch-size", "2",
                           "--max-steps", "4", "--save-steps", "0", "--no-progress", "--adapter-only",
                           "--validation-split-percentage", "10", "--max-eval-blocks", "3", "--eval-sts", sts_file,
                           "--eval-steps", "2", "--load-best-at-end", "--best-metric", "eval_sts_spearman"])
    assert a.func(a) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["last_eval"]["step"] == 4 and report["best"]["metric"] == "eval_sts_spearman"
    assert report["final_is_best"] is True
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "best" / "model.safetensors").exists()  # --adapter-only holds for best/ too


def test_a_nan_loss_stops_before_the_evaluation(tiny_model_dir, tiny_text_file, sts_file, tmp_path, monkeypatch):
    """NaN weights after step 2 are reported as the NaN-loss error at that step's evaluation (with no log or save
    there), not as the encoder's non-finite embeddings; nothing is kept as best."""
    from llm2vec_fast.training.mntp import MNTPTrainer

    poison_call(monkeypatch, MNTPTrainer, "compute_loss", at=2)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite .*checked before the step's evaluation, "
                                                 r"optimizer step 2 of 6"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path, eval_sts=sts_file, eval_steps=2, save_steps=0,
                         logging_steps=100))
    assert not (tmp_path / "best").exists()


def test_resume_with_another_best_metric(tiny_model_dir, tiny_text_file, held_out_file, tmp_path, caplog):
    """The first run picks by eval_loss; resumed picking by eval_score, the best comes from the evaluations' own
    eval_score values (never a loss compared with a score)."""
    first = tmp_path / "run"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, first, max_steps=4, validation_files=[held_out_file],
                     evaluators=[scripted([0.1, 0.2])], eval_steps=2))
    assert json.loads((first / "best" / "llm2vec_training.json").read_text())["best"]["metric"] == "eval_loss"
    with caplog.at_level("WARNING"):
        r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, first, max_steps=8, validation_files=[held_out_file],
                             evaluators=[scripted([0.15, 0.7])], eval_steps=2, best_metric="score",
                             resume_from_checkpoint=True))
    assert "this run picks by eval_score" in caplog.text
    assert [e["eval_score"] for e in r["evaluations"]] == [0.1, 0.2, 0.15, 0.7]
    assert r["best"]["metric"] == "eval_score" and r["best"]["step"] == 8 and r["best"]["value"] == 0.7


def test_best_without_a_checkpoint_and_the_direction_option(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    """greater_is_better=False minimises a metric whatever its name. Resumed from checkpoint-2 with best/ gone and
    the best evaluation (step 1) never checkpointed: said, and the best is tracked from the new evaluations."""
    first = tmp_path / "run"
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, first, max_steps=4, eval_steps=1, greater_is_better=False,
                         evaluators=[scripted([0.1, 0.3, 0.9, 0.8])]))
    assert r["best"]["step"] == 1
    shutil.rmtree(first / "best")
    shutil.rmtree(first / "checkpoint-4")
    with caplog.at_level("WARNING"):
        r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, first, max_steps=4, greater_is_better=False,
                             evaluators=[scripted([0.35, 0.31])], eval_steps=1, resume_from_checkpoint=True))
    assert "(step 1, eval_score = 0.1000) has no checkpoint left" in caplog.text
    assert [e["step"] for e in r["evaluations"]] == [1, 2, 3, 4]
    assert r["best"]["step"] == 4 and r["best"]["value"] == 0.31
    assert _same(_adapter(first / "best"), _adapter(first))


def test_nan_scores_are_recorded_as_null(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    import argparse

    from llm2vec_fast.training.cli import add_subcommands

    flat = tmp_path / "flat.csv"  # equal gold scores: Spearman is undefined
    flat.write_text("".join(f"g\tf\t2012\t{i}\t3.0\tw{i} w2\tw{i + 1} w3\n" for i in range(6)))
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["train", "mntp", "--model", tiny_model_dir, "--train-file", tiny_text_file,
                           "--output-dir", str(tmp_path / "o"), "--max-seq-length", "32", "--batch-size", "2",
                           "--max-steps", "2", "--save-steps", "0", "--no-progress", "--eval-sts", str(flat)])
    assert a.func(a) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the result line"))
    assert report["last_eval"]["eval_sts_spearman"] is None and report["best"] is None
    json.loads((tmp_path / "o" / "llm2vec_training.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in the training record"))


def test_records_of_the_best_folder(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, "rel-out", max_steps=4, evaluators=[scripted([0.2, 0.9])],
                         eval_steps=2))
    best = tmp_path / "rel-out" / "best"
    assert r["best"]["path"] == str(best)
    record = json.loads((best / "llm2vec_training.json").read_text())
    assert record["arguments"]["output_dir"] == "rel-out" and record["best"]["step"] == 4
    # the Trainer's own best fields stay unset: with them, transformers would keep the best step's checkpoint out of
    # save_total_limit's rotation and, at a limit of 1, delete the last step's at the end
    state = json.loads((tmp_path / "rel-out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_global_step"] is None and state["best_model_checkpoint"] is None


def test_checkpoints_rotate_as_without_evaluation(tiny_model_dir, tiny_text_file, tmp_path):
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, tmp_path / "o", evaluators=[scripted([0.9, 0.1, 0.2])],
                         eval_steps=2, save_total_limit=1))
    assert r["best"]["step"] == 2
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-6"]


def test_a_fresh_run_sets_an_earlier_best_aside(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    out = tmp_path / "o"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=2, evaluators=[scripted([0.5])], eval_steps=2))
    earlier = _adapter(out / "best")
    with caplog.at_level("WARNING"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=2, seed=9, evaluators=[scripted([0.1])],
                         eval_steps=2, overwrite_output_dir=True))
    assert "moved the earlier run's best/ to" in caplog.text
    assert _same(_adapter(out / "best.set-aside-1"), earlier) and not _same(_adapter(out / "best"), earlier)


def test_scores_recorded_as_null_stay_null_after_a_resume(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "o"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=4, evaluators=[scripted([float("nan"), 0.5])],
                     eval_steps=2))
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=6, evaluators=[scripted([0.6])],
                         eval_steps=2, resume_from_checkpoint=True))
    assert [e["eval_score"] for e in r["evaluations"]] == [None, 0.5, 0.6]
    for record in (out / "llm2vec_training.json", out / "best" / "llm2vec_training.json"):
        json.loads(record.read_text(), parse_constant=lambda c, f=record: pytest.fail(f"{c} in {f}"))


def test_eval_truncate_dim_wider_than_the_model_is_refused_before_training(tiny_model_dir, tiny_sentence_file,
                                                                           sts_file, tmp_path):
    with pytest.raises(ValueError, match="eval_truncate_dim 100 is more than the embedding width 64"):
        train_contrastive(ContrastiveArguments(
            mode="simcse", train_files=[tiny_sentence_file], output_dir=str(tmp_path), model=tiny_model_dir,
            batch_size=6, max_steps=4, save_steps=1, disable_tqdm=True, max_length=32, eval_sts=sts_file,
            eval_truncate_dim=100))
    assert not list(tmp_path.glob("checkpoint-*"))


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["mntp", "simcse"])
def test_gpu_evaluation_during_training(tiny_model_dir, tiny_text_file, tiny_sentence_file, held_out_file, sts_file,
                                        tmp_path, stage):
    """On CUDA (bf16 weights, bf16 autocast, Triton attention, fused LoRA): scores are finite, the logged STS score
    equals a fresh evaluation of best/ (bf16: to 0.02), and the loss curve stays that of a run without evaluation
    (to bf16 run-to-run noise)."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.evaluation import evaluate_sts

    def run(out, **kw):
        if stage == "mntp":
            return train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=4, **kw))
        return train_contrastive(ContrastiveArguments(
            mode="simcse", train_files=[tiny_sentence_file], output_dir=str(out), model=tiny_model_dir, batch_size=6,
            max_steps=4, logging_steps=1, save_steps=0, learning_rate=1e-3, disable_tqdm=True, max_length=32, **kw))

    plain = run(tmp_path / "plain")
    extra = dict(validation_files=[held_out_file]) if stage == "mntp" else {}
    r = run(tmp_path / "eval", eval_sts=sts_file, eval_steps=2, **extra)
    assert [e["step"] for e in r["evaluations"]] == [2, 4]
    assert all(v is not None for e in r["evaluations"] for v in e.values())
    for a, b in zip(plain["losses"], r["losses"], strict=True):
        assert a["step"] == b["step"] and b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    best = r["best"]
    if best["metric"] == "eval_sts_spearman":
        kw = dict(peft_model_name_or_path=best["path"]) if stage == "simcse" else {}
        loaded = LLM2Vec.from_pretrained(tiny_model_dir if stage == "simcse" else best["path"], **kw)
        got = evaluate_sts(loaded, sts_file)["scores"]["validation"][0]["main_score"]
        assert got == pytest.approx(best["value"], abs=0.02)
