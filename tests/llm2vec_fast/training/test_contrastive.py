"""SimCSE and supervised drivers end to end on a tiny random Llama; outputs load with LLM2Vec."""
import csv
import json

import pytest
import torch

from llm2vec_fast.training.contrastive import (
    ContrastiveArguments,
    TextCollator,
    build_dataset,
    load_encoder,
    train_contrastive,
)

from .conftest import poison_call, sentences


def _triplet_csv(path, seed):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "sent0", "sent1", "hard_neg"])
        for a, b, c in zip(sentences(24, seed), sentences(24, seed + 1), sentences(24, seed + 2), strict=True):
            w.writerow(["train", a, b, c])
        w.writerow(["test", "w1 w2", "w3 w4", "w5 w6"])
    return str(path)


def _args(mode, files, out, **kw):
    base = dict(mode=mode, train_files=files, output_dir=str(out), batch_size=6, max_steps=3, logging_steps=1,
                save_steps=0, learning_rate=1e-3, disable_tqdm=True, max_length=32)
    base.update(kw)
    return ContrastiveArguments(**base)


def test_recipe_defaults():
    a = ContrastiveArguments(mode="simcse", train_files=["x"], output_dir="o")
    assert (a.batch_size, a.max_length, a.learning_rate, a.scale, a.attention_dropout) == (128, 128, 3e-5, 20.0, 0.3)
    s = ContrastiveArguments(mode="supervised", train_files=["x"], output_dir="o")
    assert (s.scale, s.attention_dropout) == (50.0, 0.0)
    with pytest.raises(ValueError, match="mode"):
        ContrastiveArguments(mode="mlm", train_files=["x"], output_dir="o")


def test_simcse_after_mntp_trains_and_loads(tiny_model_dir, tiny_text_file, tiny_sentence_file, tmp_path):
    """MNTP (release layout) → SimCSE on the MNTP-merged base → LLM2Vec.from_pretrained(mntp, peft=simcse)."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    mntp = tmp_path / "mntp"
    train_mntp(MNTPArguments(train_files=[tiny_text_file], output_dir=str(mntp), model=tiny_model_dir,
                             max_seq_length=32, batch_size=2, max_steps=2, save_steps=0, learning_rate=1e-2,
                             disable_tqdm=True))
    out = tmp_path / "simcse"
    args = _args("simcse", [tiny_sentence_file], out, model=str(mntp))
    r = train_contrastive(args)
    assert r["steps_run"] == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r["losses"])
    info = json.loads((out / "llm2vec_training.json").read_text())
    assert info["stage"] == "simcse" and info["load_with"]["base_model_name_or_path"] == str(mntp)

    texts = sentences(4, seed=77)
    loaded = LLM2Vec.from_pretrained(str(mntp), peft_model_name_or_path=str(out), device="cpu")
    e = loaded.encode(texts, show_progress_bar=False)
    # the same model assembled by hand: base + MNTP adapter merged, then the SimCSE adapter
    from peft import PeftModel

    by_hand = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(mntp), merge_peft=True,
                                      device="cpu")
    by_hand.model = PeftModel.from_pretrained(by_hand.model, str(out))
    torch.testing.assert_close(e, by_hand.encode(texts, show_progress_bar=False), rtol=1e-4, atol=1e-5)
    mntp_only = LLM2Vec.from_pretrained(str(mntp), device="cpu").encode(texts, show_progress_bar=False)
    assert (e - mntp_only).abs().max() > 1e-4  # the SimCSE adapter changed something


def test_simcse_views_differ_by_attention_dropout(tiny_model_dir, tiny_sentence_file, tmp_path):
    enc = load_encoder(_args("simcse", [tiny_sentence_file], tmp_path, model=tiny_model_dir, lora_dropout=0.0))
    feats = enc.tokenize(sentences(3, seed=4))
    enc.train()
    with torch.no_grad():
        assert (enc(feats) - enc(feats)).abs().max() > 1e-4  # dropout 0.3 in attention only
    batch = TextCollator("simcse")(["a b", "c d"])
    assert batch == {"texts": ["a b", "c d", "a b", "c d"], "sizes": (2, 2, 0)}


def test_supervised_multi_dataset_gradcache(tiny_model_dir, tmp_path):
    f1, f2 = _triplet_csv(tmp_path / "one.csv", 1), _triplet_csv(tmp_path / "two.csv", 5)
    args = _args("supervised", [f1, f2], tmp_path / "out", model=tiny_model_dir, split="train",
                 instructions=["w7 w8", "w9"], gradcache_chunk_size=5, mask_false_negatives=True)
    dataset, collator, grouped = build_dataset(args)
    assert grouped and len(dataset) == 48
    for i in range(0, 48, 6):
        batch = [dataset[j] for j in range(i, i + 6)]
        assert len({name for name, _ in batch}) == 1  # one source dataset per batch
    b = collator([dataset[j] for j in range(6)])
    assert b["sizes"] == (6, 6, 6)
    instr = "w7 w8; " if dataset[0][0] == "one" else "w9; "
    assert b["texts"][0] == [instr, dataset[0][1]["query"]] and isinstance(b["texts"][6], str)
    r = train_contrastive(args)
    assert r["steps_run"] == 3 and len(r["losses"]) == 3
    from llm2vec_fast import LLM2Vec

    e = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(tmp_path / "out"), device="cpu")
    assert e.pooling_mode == "mean"
    assert torch.isfinite(e.encode([["w9;", "w1 w2"], "w3"], show_progress_bar=False)).all()


def test_several_hard_negatives_per_query(tiny_model_dir, tmp_path, caplog):
    rows = [{"query": f"w{i} w{i + 1}", "positive": f"w{i + 2}", "negative": [f"w{i + 3}", f"w{i + 4} w5", "w6"]}
            for i in range(12)]
    rows[4]["negative"] = rows[4]["negative"][:2]  # one example has only two: every batch then takes two
    f = tmp_path / "multi.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = _args("supervised", [str(f)], tmp_path / "out", model=tiny_model_dir, num_negatives=3, batch_size=4,
                 gradcache_chunk_size=5)
    with caplog.at_level("WARNING"):
        dataset, collator, _ = build_dataset(args)
    assert "1 of 12 examples have fewer than 3 hard negatives (fewest: 2); training with 2" in caplog.text
    b = collator([dataset[j] for j in range(4)])
    assert b["sizes"] == (4, 4, 8) and b["texts"][8:10] == ["w3", "w4 w5"]
    ex = [dataset[j] for j in range(4)]
    assert TextCollator("supervised", negatives=0)(ex)["sizes"] == (4, 4, 0)
    with pytest.raises(ValueError, match="has 2 hard negatives, the batch needs 3"):
        TextCollator("supervised", negatives=3)([dataset[4]])
    with pytest.raises(ValueError, match="num_negatives must be an int >= 0, got -1"):
        _args("supervised", [str(f)], tmp_path, num_negatives=-1)
    r = train_contrastive(args)
    assert r["steps_run"] == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in r["losses"])


def test_adapter_folder_alone_loads_on_its_recorded_base(tiny_model_dir, tiny_sentence_file, tmp_path):
    from llm2vec_fast import LLM2Vec

    train_contrastive(_args("simcse", [tiny_sentence_file], tmp_path / "simcse", model=tiny_model_dir))
    texts = ["first words here", "second"]
    alone = LLM2Vec.from_pretrained(str(tmp_path / "simcse"), device="cpu").encode(texts, show_progress_bar=False)
    explicit = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(tmp_path / "simcse"),
                                       device="cpu").encode(texts, show_progress_bar=False)
    torch.testing.assert_close(alone, explicit, rtol=0, atol=0)
    # a recorded base that is gone: the error says what to pass
    record = json.loads((tmp_path / "simcse" / "llm2vec_training.json").read_text())
    record["load_with"]["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "simcse" / "llm2vec_training.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="which is not here: pass the base model"):
        LLM2Vec.from_pretrained(str(tmp_path / "simcse"), device="cpu")


def test_adapter_trained_on_a_merged_adapter_loads_in_one_call(tiny_model_dir, tiny_text_file, tiny_sentence_file,
                                                                tmp_path, monkeypatch):
    """`train simcse --peft MNTP_ADAPTER` (adapter-only MNTP): the output loads alone or on its recorded base, with
    the MNTP adapter merged first, as training had it; on another base (one with it merged already) as given."""
    from peft import PeftModel

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    mntp = tmp_path / "mntp"
    train_mntp(MNTPArguments(train_files=[tiny_text_file], output_dir=str(mntp), model=tiny_model_dir,
                             max_seq_length=32, batch_size=2, max_steps=2, save_steps=0, learning_rate=1e-2,
                             disable_tqdm=True, release_layout=False))
    assert json.loads((mntp / "llm2vec_config.json").read_text())["max_length"] == 512  # not the block length
    monkeypatch.chdir(tmp_path)  # relative paths: the record must hold absolute ones
    out = tmp_path / "simcse"
    train_contrastive(_args("simcse", [tiny_sentence_file], "simcse", model=tiny_model_dir, peft="mntp"))
    record = json.loads((out / "llm2vec_training.json").read_text())["load_with"]
    assert record["merged_adapter"] == str(mntp.resolve())
    texts = sentences(4, seed=78)
    by_hand = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(mntp), merge_peft=True,
                                      device="cpu")
    merged_dir = tmp_path / "merged"
    by_hand.save(str(merged_dir))
    by_hand.model = PeftModel.from_pretrained(by_hand.model, str(out))
    expected = by_hand.encode(texts, show_progress_bar=False)
    monkeypatch.chdir("/")
    for loaded in (LLM2Vec.from_pretrained(str(out), device="cpu"),
                   LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out), device="cpu"),
                   LLM2Vec.from_pretrained(str(merged_dir), peft_model_name_or_path=str(out), device="cpu")):
        torch.testing.assert_close(loaded.encode(texts, show_progress_bar=False), expected, rtol=1e-4, atol=1e-5)
    assert LLM2Vec.from_pretrained(str(out), device="cpu").max_length == 512


def test_run_arguments_are_checked_before_loading(tiny_model_dir, tmp_path):
    from llm2vec_fast.training.mntp import MNTPArguments

    for kw, message in [(dict(max_steps=0), "max_steps must be an int >= 1, got 0"),
                        (dict(max_steps=-1), "max_steps must be an int >= 1, got -1"),
                        (dict(grad_accum=0), "grad_accum must be an int >= 1, got 0"),
                        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
                        (dict(save_steps=-1), "save_steps must be an int >= 0 \\(0: no checkpoints\\), got -1"),
                        (dict(max_examples=0), "max_examples must be an int >= 1 or None, got 0"),
                        (dict(learning_rate=0.0), "learning_rate must be a number > 0, got 0.0")]:
        with pytest.raises(ValueError, match=message):
            _args("simcse", ["x"], tmp_path / "o", **kw)
    with pytest.raises(ValueError, match="max_blocks must be an int >= 1 or None, got 0"):
        MNTPArguments(train_files=["x"], output_dir=str(tmp_path / "o"), max_blocks=0)
    with pytest.raises(ValueError, match="is the model folder this run trains from"):
        _args("simcse", ["x"], tiny_model_dir, model=tiny_model_dir)
    with pytest.raises(ValueError, match="is the peft folder this run trains from"):
        _args("supervised", ["x"], tiny_model_dir + "/", peft=tiny_model_dir)


def test_mntp_refuses_a_model_that_carries_an_adapter(tiny_model_dir, tiny_text_file, tmp_path):
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    first = tmp_path / "mntp"
    train_mntp(MNTPArguments(train_files=[tiny_text_file], output_dir=str(first), model=tiny_model_dir,
                             max_seq_length=32, batch_size=2, max_steps=1, save_steps=0, disable_tqdm=True))
    with pytest.raises(ValueError, match="carries a LoRA adapter .*--resume"):
        train_mntp(MNTPArguments(train_files=[tiny_text_file], output_dir=str(tmp_path / "again"), model=str(first),
                                 max_seq_length=32, batch_size=2, max_steps=1, save_steps=0, disable_tqdm=True))


@pytest.mark.parametrize("chunk", [None, 5], ids=["in-batch", "gradcache"])
def test_a_nan_loss_stops_contrastive_training(tiny_model_dir, tmp_path, monkeypatch, chunk):
    from llm2vec_fast.training.contrastive import ContrastiveTrainer

    poison_call(monkeypatch, ContrastiveTrainer, "_loss", at=2)
    f = _triplet_csv(tmp_path / "one.csv", 1)
    args = _args("supervised", [f], tmp_path / "out", model=tiny_model_dir, split="train", gradcache_chunk_size=chunk)
    with pytest.raises(FloatingPointError, match=r"after step 1 .*optimizer step 2 of 3"):
        train_contrastive(args)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("lines", [0, 5])
def test_fewer_examples_than_a_batch_is_an_error(tmp_path, lines):
    f = tmp_path / "few.txt"
    f.write_text("".join(f"sentence number {i}\n" for i in range(lines)))
    with pytest.raises(ValueError, match=rf"{lines} training examples in .*few.txt.*fewer than one batch of 6"):
        train_contrastive(_args("simcse", [str(f)], tmp_path / "out", model="no-model-is-loaded-first"))


def test_matryoshka_training(tiny_model_dir, tmp_path, capsys):
    """--matryoshka-dims reaches the loss (the trainer's loss is the twin's Matryoshka sum), trains with GradCache,
    is recorded with the output, and dims wider than the model are refused before training."""
    import argparse

    from llm2vec_fast.training.cli import add_subcommands
    from llm2vec_fast.training.contrastive import ContrastiveTrainer
    from llm2vec_fast.training.losses import hard_negative_nll_loss_ref

    trainer = ContrastiveTrainer.__new__(ContrastiveTrainer)
    trainer.scale, trainer.loss_name, trainer.mask_false_negatives = 20.0, "infonce", False
    trainer.matryoshka_dims, trainer.matryoshka_weights = [64, 16, 8], [1.0, 0.5, 0.25]
    reps = torch.randn(12, 64, dtype=torch.float64)
    for symmetric in (False, True):
        trainer.symmetric = symmetric
        torch.testing.assert_close(trainer._loss(reps, (4, 4, 4)), hard_negative_nll_loss_ref(
            reps[:4], reps[4:8], reps[8:], 20.0, matryoshka_dims=[64, 16, 8], matryoshka_weights=[1.0, 0.5, 0.25],
            symmetric=symmetric))

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    data = _triplet_csv(tmp_path / "t.csv", 3)
    argv = ["train", "supervised", "--model", tiny_model_dir, "--train-file", data, "--output-dir",
            str(tmp_path / "out"), "--batch-size", "4", "--max-steps", "2", "--save-steps", "0", "--no-progress",
            "--max-length", "32", "--gradcache-chunk-size", "5", "--symmetric", "--matryoshka-dims", "64,16,8",
            "--matryoshka-weights", "1,0.5,0.25"]
    a = parser.parse_args(argv)
    assert a.func(a) == 0
    rec = json.loads((tmp_path / "out" / "llm2vec_training.json").read_text())
    assert rec["arguments"]["symmetric"] is True
    assert rec["arguments"]["matryoshka_dims"] == [64, 16, 8]
    assert rec["arguments"]["matryoshka_weights"] == [1.0, 0.5, 0.25]
    capsys.readouterr()
    a = parser.parse_args(argv[:-4] + ["--matryoshka-dims", "128,16", "--overwrite-output-dir"])
    with pytest.raises(ValueError, match="128 is more than the embedding width 64"):
        a.func(a)
    with pytest.raises(SystemExit):
        parser.parse_args(argv[:-4] + ["--matryoshka-dims", "64,half"])
    assert "comma-separated integers" in capsys.readouterr().err


def _scored_csv(path, seed, n=30):
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence1", "sentence2", "score"])
        for a, b in zip(sentences(n, seed), sentences(n, seed + 1), strict=True):
            w.writerow([a, b, round(rng.uniform(0, 5), 1)])
    return str(path)


@pytest.mark.parametrize("loss", ["cosent", "angle", "cosine"])
def test_scored_pairs_loss_reaches_the_trainer(tiny_model_dir, tmp_path, loss):
    """Scored pairs: the collator puts the instruction on both texts and the rescaled scores beside them, and the
    trainer's loss is the twin's (Matryoshka included)."""
    from llm2vec_fast.training.contrastive import ContrastiveTrainer
    from llm2vec_fast.training.losses import scored_pair_loss_ref

    data = _scored_csv(tmp_path / "p.csv", 3)
    args = _args("scored", [data], tmp_path / "out", model=tiny_model_dir, instructions=["w7 w8"], loss=loss,
                 score_range=(0, 5))
    dataset, collator, grouped = build_dataset(args)
    assert not grouped and len(dataset) == 30
    b = collator([dataset[i] for i in range(4)])
    assert b["sizes"] == (4, 4, 0) and len(b["texts"]) == 8
    assert b["texts"][0] == ["w7 w8; ", dataset[0]["text1"]] and b["texts"][4] == ["w7 w8; ", dataset[0]["text2"]]
    with open(data) as f:
        raw = [float(r["score"]) for r in csv.DictReader(f)][:4]
    torch.testing.assert_close(b["scores"], torch.tensor(raw) / 5)

    trainer = ContrastiveTrainer.__new__(ContrastiveTrainer)
    trainer.scale, trainer.loss_name, trainer.mask_false_negatives = 20.0, loss, False
    trainer.matryoshka_dims, trainer.matryoshka_weights = [64, 16], [1.0, 0.5]
    reps, y = torch.randn(8, 64, dtype=torch.float64), b["scores"].double()
    torch.testing.assert_close(trainer._loss(reps, b["sizes"], y), scored_pair_loss_ref(
        reps[:4], reps[4:], y, loss, 20.0, matryoshka_dims=[64, 16], matryoshka_weights=[1.0, 0.5]))


def test_scored_pairs_train_with_gradcache_and_evaluation(tiny_model_dir, tmp_path, capsys):
    """``train scored`` end to end: GradCache gives the in-batch loss curve, two files train one file per batch,
    STS evaluation runs during training, the output records the score scale and loads with LLM2Vec."""
    import argparse

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.cli import add_subcommands

    f1, f2 = _scored_csv(tmp_path / "one.csv", 1), _scored_csv(tmp_path / "two.csv", 5)
    # LoRA dropout off: GradCache draws each chunk's masks, the plain step the whole batch's
    plain = train_contrastive(_args("scored", [f1], tmp_path / "plain", model=tiny_model_dir, lora_dropout=0.0))
    cached = train_contrastive(_args("scored", [f1], tmp_path / "cached", model=tiny_model_dir, lora_dropout=0.0,
                                     gradcache_chunk_size=5))
    curve = [x["loss"] for x in plain["losses"]]
    assert len(curve) == 3 and len(set(curve)) > 1
    assert curve == pytest.approx([x["loss"] for x in cached["losses"]], rel=1e-5)

    sts = tmp_path / "sts-dev.csv"  # STS-B layout: genre, file, year, id, score, s1, s2
    sts.write_text("".join(f"g\tf\t2012\t{i:04d}\t{i % 6}.0\t{a}\t{b}\n" for i, (a, b) in
                           enumerate(zip(sentences(12, 40), sentences(12, 41), strict=True))))
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    a = parser.parse_args(["train", "scored", "--model", tiny_model_dir, "--train-file", f1, "--train-file", f2,
                           "--output-dir", str(out), "--batch-size", "6", "--max-steps", "2", "--save-steps", "0",
                           "--no-progress", "--loss", "angle", "--score-range", "0,5", "--instruction", "w9",
                           "--eval-sts", str(sts), "--eval-steps", "1"])
    assert a.func(a) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = json.loads((out / "llm2vec_training.json").read_text())
    assert rec["stage"] == "scored" and rec["arguments"]["loss"] == "angle"
    assert rec["arguments"]["score_range"] == [0.0, 5.0] and len(rec["evaluations"]) == 2
    assert rec["score_scales"] == {f1: [0.0, 5.0], f2: [0.0, 5.0]}
    # STS is scored as the pairs were trained: with the training instruction on both texts
    assert rec["arguments"]["eval_sts_instruction"] == "w9; "
    from llm2vec_fast.evaluation import evaluate_sts

    e = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out), device="cpu")
    final = evaluate_sts(e, str(sts), instruction="w9; ")["scores"]["validation"][0]["main_score"]
    assert line["steps"] == 2 and line["last_eval"]["eval_sts_spearman"] == pytest.approx(final, abs=1e-6)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "scored", "--model", tiny_model_dir, "--train-file", f1, "--output-dir",
                           str(out), "--score-range", "5,0"])
    assert "LOW < HIGH" in capsys.readouterr().err


@pytest.mark.parametrize("mode, kw, match", [
    ("scored", dict(loss="infonce"), "not one of scored's"),
    ("supervised", dict(loss="cosent"), "not one of supervised's"),
    ("supervised", dict(score_range=(0, 5)), "applies to scored pairs"),
    ("scored", dict(score_range=(5, 0)), "low < high"),
    ("scored", dict(score_range=(0, 1, 2)), "low < high"),
    ("simcse", dict(split="train"), "does not apply to simcse"),
    ("scored", dict(score_range=(0, float("inf"))), "finite numbers"),
    ("scored", dict(score_range=(False, True)), "finite numbers"),
    ("scored", dict(batch_size=1), "a batch of one pair has no loss"),
    ("supervised", dict(loss="cosine", scale=50.0), "not one of supervised's"),
    ("scored", dict(eval_sts_instruction="w1"), "eval_sts_instruction given without eval_sts"),
    ("scored", dict(symmetric=True), "scored pairs have no such direction"),
    ("scored", dict(mask_false_negatives=True), "not to scored pairs"),
    ("scored", dict(loss="cosine", scale=20.0), "no effect with the cosine loss"),
])
def test_scored_arguments_are_checked(mode, kw, match):
    with pytest.raises(ValueError, match=match):
        ContrastiveArguments(mode=mode, train_files=["x"], output_dir="o", **kw)


def test_scored_file_scales(tmp_path, caplog):
    """Scores of an unknown scale: used as they are within [-1, 1] (sentence-transformers' convention); beyond it
    the cosine loss asks for a range, CoSENT maps the file's own range (the order is all it reads); the scale used
    is what the collator carries into the record."""
    signed = tmp_path / "signed.csv"
    signed.write_text("sentence1,sentence2,score\n" + "".join(f"w{i},w{i + 1},{(i % 5 - 2) / 2}\n" for i in range(12)))
    wide = tmp_path / "wide.csv"
    wide.write_text("sentence1,sentence2,score\n" + "".join(f"w{i},w{i + 1},{i % 7}\n" for i in range(12)))
    ds, collator, _ = build_dataset(_args("scored", [str(signed)], tmp_path / "o", loss="cosine"))
    assert collator.score_scales == {str(signed): None}
    assert [ds[i]["score"] for i in range(5)] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"scores span \[0.0, 6.0\], beyond the \[-1, 1\] of cosines: give "
                                         "score_range"):
        build_dataset(_args("scored", [str(wide)], tmp_path / "o", loss="cosine"))
    ds, collator, _ = build_dataset(_args("scored", [str(wide)], tmp_path / "o", loss="cosine", score_range=(0, 10)))
    assert collator.score_scales == {str(wide): [0.0, 10.0]} and ds[1]["score"] == 0.1
    with caplog.at_level("INFO"):
        ds, collator, _ = build_dataset(_args("scored", [str(wide)], tmp_path / "o"))
    assert collator.score_scales == {str(wide): [0.0, 6.0]} and ds[3]["score"] == 0.5
    assert "the loss reads only their order" in caplog.text


def test_scored_data_with_one_score_is_refused_before_loading(tmp_path):
    c = tmp_path / "same.csv"
    c.write_text("sentence1,sentence2,score\n" + "".join(f"w{i},w{i + 1},2\n" for i in range(20)))
    with pytest.raises(ValueError, match="every pair has the score 2.0"):
        train_contrastive(_args("scored", [str(c)], tmp_path / "out", model="no-such-org/no-such-model"))


@pytest.mark.parametrize("chunk", [None, 5], ids=["in-batch", "gradcache"])
def test_gist_guide_filters_during_training(tiny_model_dir, tmp_path, chunk):
    """--guide-model (GISTEmbed): a guide whose filter lets everything through, without the extra candidate blocks,
    trains exactly as plain InfoNCE does (same candidates, same order); the default filter changes the curve; the
    options are recorded; GradCache computes the guide once per step."""
    f = _triplet_csv(tmp_path / "one.csv", 1)
    common = dict(model=tiny_model_dir, split="train", gradcache_chunk_size=chunk)
    plain = train_contrastive(_args("supervised", [f], tmp_path / "plain", **common))
    passthrough = train_contrastive(_args("supervised", [f], tmp_path / "pass", guide_model=tiny_model_dir,
                                          guide_margin=-10.0, contrast_anchors=False, contrast_positives=False,
                                          **common))
    assert [r["loss"] for r in passthrough["losses"]] == pytest.approx([r["loss"] for r in plain["losses"]],
                                                                       rel=1e-6)
    gist = train_contrastive(_args("supervised", [f], tmp_path / "gist", guide_model=tiny_model_dir, **common))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in gist["losses"])
    assert gist["losses"][0]["loss"] != pytest.approx(plain["losses"][0]["loss"], rel=1e-3)
    rec = json.loads((tmp_path / "gist" / "llm2vec_training.json").read_text())["arguments"]
    assert rec["guide_model"] == tiny_model_dir and rec["guide_margin_strategy"] == "absolute"


def test_gist_arguments_are_checked(tmp_path):
    import argparse

    from llm2vec_fast.training.cli import add_subcommands

    with pytest.raises(ValueError, match="mode 'supervised', not 'simcse'"):
        _args("simcse", ["x"], tmp_path, guide_model="g")
    with pytest.raises(ValueError, match="not with mask_false_negatives or symmetric"):
        _args("supervised", ["x"], tmp_path, guide_model="g", symmetric=True)
    with pytest.raises(ValueError, match="guide_margin_strategy must be 'absolute' or 'relative', got 'rel'"):
        _args("supervised", ["x"], tmp_path, guide_model="g", guide_margin_strategy="rel")
    with pytest.raises(ValueError, match="guide_margin given without guide_model"):
        _args("supervised", ["x"], tmp_path, guide_margin=0.1)
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["train", "supervised", "--train-file", "x", "--output-dir", "o", "--guide-model", "g",
                           "--guide-margin", "0.05", "--guide-margin-strategy", "relative", "--no-contrast-anchors"])
    assert (a.guide_model, a.guide_margin, a.guide_margin_strategy, a.no_contrast_anchors,
            a.no_contrast_positives) == ("g", 0.05, "relative", True, False)


def test_document_instructions_per_file(tmp_path):
    """--document-instruction puts an instruction on positives and hard negatives too (the original's E5 symmetric
    tasks), per file like --instruction ('' for none)."""
    a, b = _triplet_csv(tmp_path / "a.csv", 1), _triplet_csv(tmp_path / "b.csv", 2)
    args = _args("supervised", [a, b], tmp_path / "out", split="train", batch_size=4,
                 instructions=["Find similar", "Retrieve answers"], document_instructions=["Find similar", ""])
    dataset, collator, grouped = build_dataset(args)
    assert grouped
    for start in range(0, len(dataset), 4):
        batch = [dataset[j] for j in range(start, start + 4)]
        texts, name = collator(batch)["texts"], batch[0][0]
        if name == "a":
            assert all(isinstance(t, list) and t[0] == "Find similar; " for t in texts)
        else:
            assert all(isinstance(t, list) for t in texts[:4]) and all(isinstance(t, str) for t in texts[4:])
    with pytest.raises(ValueError, match="give one document instruction for all files or one per file: 3"):
        build_dataset(_args("supervised", [a, b], tmp_path / "o2", document_instructions=["x", "y", "z"]))
    with pytest.raises(ValueError, match="document_instructions are for supervised training, not simcse"):
        _args("simcse", [a], tmp_path / "o3", document_instructions=["x"])
