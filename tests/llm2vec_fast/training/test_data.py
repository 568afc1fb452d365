"""MNTP data and masking collator, contrastive data readers."""
import json

import pytest
import torch

from llm2vec_fast.training.data import (
    BlockDataset,
    MNTPCollator,
    one_dataset_per_batch,
    read_documents,
    read_scored_pairs,
    read_triplets,
    rescale_scores,
    resolve_mask_token,
    with_instruction,
)

from .conftest import make_tokenizer, sentences


def test_read_documents_splits(tmp_path):
    blank = tmp_path / "b.txt"
    blank.write_text("\n a b \n c\n \n\n d e\n")
    assert read_documents(blank) == ["a b\nc", "d e"]
    assert read_documents(blank, "line") == ["a b", "c", "d e"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\n\n")  # trailing blank lines do not make it blank-separated
    assert read_documents(lines) == ["one", "two"]
    with pytest.raises(ValueError, match="split"):
        read_documents(lines, "para")


def test_block_dataset_concatenates_and_drops_tail():
    tok = make_tokenizer()
    docs = sentences(20)
    ids = [t for d in docs for t in tok(d)["input_ids"]]
    ds = BlockDataset(docs, tok, block_size=16)
    assert len(ds) == len(ids) // 16
    assert ds[1]["input_ids"].tolist() == ids[16:32]
    assert ds.blocks[:, 0].tolist() != [1] * len(ds)  # blocks cut across documents, not per document
    assert len(BlockDataset(docs, tok, block_size=16, max_blocks=3)) == 3
    with pytest.raises(ValueError, match="fewer than one block"):
        BlockDataset(["w1 w2"], tok, block_size=64)


def _big_batch(tok, n=256, length=64):
    torch.manual_seed(0)
    ids = torch.randint(7, len(tok), (n, length))
    ids[:, 0] = tok.bos_token_id
    ids[:, 5] = tok.eos_token_id
    return ids


@pytest.mark.parametrize("recipe", ["llama", "mistral"])
def test_collator_statistics(recipe):
    tok = make_tokenizer()
    mask_id = resolve_mask_token(tok)
    coll = MNTPCollator.recipe(recipe, tok, mask_id)
    ids = _big_batch(tok)
    torch.manual_seed(1)
    out = coll.mask(ids)
    sel = out["labels"] != -100
    maskable = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    p = sel.sum().item() / maskable.sum().item()
    n = sel.sum().item()
    assert torch.equal(out["labels"][sel], ids[sel])
    assert torch.equal(out["input_ids"][~sel], ids[~sel])  # unselected tokens are never touched
    as_mask = (out["input_ids"][sel] == mask_id).float().mean().item()
    unchanged = (out["input_ids"][sel] == ids[sel]).float().mean().item()
    if recipe == "llama":
        assert abs(p - 0.2) < 0.015, p
        assert abs(as_mask - 0.8) < 0.03, as_mask
        # 10 % kept as is (plus random draws that hit the same token: ~1/len(vocab))
        assert abs(unchanged - 0.1) < 0.025, unchanged
        assert n > 2000
    else:
        assert abs(p - 0.8) < 0.015, p
        assert as_mask == 1.0


def test_special_tokens_never_masked():
    tok = make_tokenizer()
    mask_id = resolve_mask_token(tok)
    coll = MNTPCollator(tok, mask_id, mlm_probability=1.0, mask_replace=0.5, random_replace=0.5)
    ids = _big_batch(tok, n=8, length=32)
    out = coll.mask(ids)
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert (out["labels"][special] == -100).all()
    assert torch.equal(out["input_ids"][special], ids[special])
    assert (out["labels"][~special] != -100).all()  # p = 1: every other token is a target


def test_collator_rejects_bad_probabilities():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="mlm_probability"):
        MNTPCollator(tok, 4, mlm_probability=0.0)
    with pytest.raises(ValueError, match="mask_replace"):
        MNTPCollator(tok, 4, mask_replace=0.9, random_replace=0.2)
    with pytest.raises(ValueError, match="recipe"):
        MNTPCollator.recipe("bert", tok, 4)


def test_mask_token_choices():
    tok = make_tokenizer()
    assert tok.mask_token is None
    assert resolve_mask_token(tok) == tok.convert_tokens_to_ids("_")  # the original's "_"
    assert resolve_mask_token(tok, "auto") == tok.convert_tokens_to_ids("_")  # now the tokenizer has one
    tok = make_tokenizer()
    assert resolve_mask_token(tok, "eos") == tok.eos_token_id
    tok = make_tokenizer()
    n = len(tok)
    mid = resolve_mask_token(tok, "mask")
    assert mid == n and tok.mask_token == "<mask>" and len(tok) == n + 1
    with pytest.raises(ValueError, match="mask token kind"):
        resolve_mask_token(tok, "pad")


def test_read_triplets_snli_and_jsonl(data_dir, tmp_path):
    snli = data_dir / "snli" / "snli_devtest_triplets.csv"
    dev = read_triplets(snli, split="dev", limit=50)
    assert len(dev) == 50 and all(e["negative"] for e in dev)
    assert dev[0]["query"].startswith("Two women are embracing")
    assert read_triplets(snli, split="test", limit=3)[0]["query"] != dev[0]["query"]
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"query": "q", "positive": "p", "negative": ["n1", "n2"]}) + "\n"
                 + json.dumps({"query": "q2", "positive": "p2"}) + "\n")
    assert read_triplets(j) == [{"query": "q", "positive": "p", "negative": "n1", "negatives": ["n1", "n2"]},
                                {"query": "q2", "positive": "p2", "negative": None, "negatives": []}]
    # sentence-transformers style numbered columns, in number order, empty cells skipped
    c = tmp_path / "x.csv"
    c.write_text("anchor,positive,negative_2,negative_1,negative_10\nq,p,n2,n1,n10\nq2,p2,,m1,\n")
    rows = read_triplets(c)
    assert [r["negatives"] for r in rows] == [["n1", "n2", "n10"], ["m1"]] and rows[1]["negative"] == "m1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "positive": "p"}) + "\n")
    with pytest.raises(ValueError, match="no query column"):
        read_triplets(bad)


def test_one_dataset_per_batch_groups():
    data = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(7)]}
    order = one_dataset_per_batch(data, 3, seed=0)
    assert len(order) == 9 + 6  # full batches only
    for i in range(0, len(order), 3):
        assert len({name for name, _ in order[i:i + 3]}) == 1
    assert len({x for _, x in order}) == len(order)


def test_with_instruction_on_queries():
    assert with_instruction("text", None) == "text"
    assert with_instruction("text", " Retrieve it ") == ["Retrieve it; ", "text"]


def test_read_errors_name_the_file_and_line(tmp_path):
    from llm2vec_fast.training.data import read_documents, read_triplets

    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n\n\nnot json\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: not valid JSON"):
        read_triplets(bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("sent0,sent1\nok,fine\ncaf\u00e9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.csv:3: not UTF-8 text \(byte 0xe9"):
        read_triplets(latin)
    latin_txt = tmp_path / "latin.txt"
    latin_txt.write_bytes(latin.read_bytes())
    with pytest.raises(ValueError, match=r"latin.txt:3: not UTF-8"):
        read_documents(latin_txt)
    empty = tmp_path / "empty_cell.csv"
    empty.write_text("sent0,sent1,hard_neg\na,b,c\nd,,f\n")
    with pytest.raises(ValueError, match=r"empty_cell.csv:3: the positive \('sent1'\) is empty"):
        read_triplets(empty)


def test_read_triplets_limit_and_negative_types(tmp_path):
    from llm2vec_fast.training.data import read_sentences, read_triplets

    f = tmp_path / "t.jsonl"
    f.write_text('{"query": "q1", "positive": "p1", "negative": ["n1", 5]}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: hard negatives must be strings, got 5"):
        read_triplets(f)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"limit must be a positive int or None, got {bad}"):
            read_triplets(f, limit=bad)
        with pytest.raises(ValueError, match=f"limit must be a positive int or None, got {bad}"):
            read_sentences(f, limit=bad)


def test_read_scored_pairs_sts_sick_and_tables(data_dir, tmp_path):
    """STS-B (a tab-separated .csv) and SICK are recognised with their score scales; header tables, JSONL and JSON
    arrays read their named columns; a byte-order mark changes nothing; rescaling maps the scale to [0, 1]."""
    rows, scale = read_scored_pairs(data_dir / "stsb" / "sts-train.csv", limit=4)
    assert scale == (0.0, 5.0) and len(rows) == 4
    assert rows[0] == {"text1": "A plane is taking off.", "text2": "An air plane is taking off.", "score": 5.0}
    rows, scale = read_scored_pairs(data_dir / "sick" / "SICK_trial.txt")
    assert scale == (1.0, 5.0) and len(rows) == 500 and all(1 <= r["score"] <= 5 for r in rows)
    scaled = rescale_scores(rows, scale)
    assert all(r["score"] == (o["score"] - 1) / 4 for r, o in zip(scaled, rows, strict=True))
    # the same layouts written here, with a byte-order mark as spreadsheet exports write it
    sts = tmp_path / "mine.csv"
    sts.write_text("\ufeffg\tf\t2012\t0001\t4.0\tA b.\tC d.\ng\tf\t2012\t0002\t1.5\tE f.\tG h.\textra\n")
    assert read_scored_pairs(sts) == ([{"text1": "A b.", "text2": "C d.", "score": 4.0},
                                       {"text1": "E f.", "text2": "G h.", "score": 1.5}], (0.0, 5.0))
    sick = tmp_path / "SICK.txt"
    sick.write_text("\ufeffpair_ID\tsentence_A\tsentence_B\trelatedness_score\tSemEval_set\n"
                    "1\ta\tb\t4.5\tTRAIN\n2\tc\td\t2\tTEST\n3\te\tf\t3\ttrain\n")
    rows, scale = read_scored_pairs(sick, split="TRAIN")
    assert scale == (1.0, 5.0) and [r["text1"] for r in rows] == ["a", "e"]
    c = tmp_path / "pairs.csv"
    c.write_text('\ufeffsentence1,sentence2,score\na b,"c, d",2\ne,f,4.5\n')
    rows, scale = read_scored_pairs(c)
    assert scale is None and rows == [{"text1": "a b", "text2": "c, d", "score": 2.0},
                                      {"text1": "e", "text2": "f", "score": 4.5}]
    assert rescale_scores(rows, None) == rows  # None: as they are
    assert [r["score"] for r in rescale_scores(rows, (0, 5))] == [0.4, 0.9]
    j = tmp_path / "pairs.jsonl"
    j.write_text(json.dumps({"sentence_A": "x", "sentence_B": "y", "label": 1}) + "\n\n"
                 + json.dumps({"sentence_A": "z", "sentence_B": "w", "label": "0"}) + "\n")
    assert read_scored_pairs(j)[0] == [{"text1": "x", "text2": "y", "score": 1.0},
                                       {"text1": "z", "text2": "w", "score": 0.0}]
    t = tmp_path / "pairs.tsv"  # TSV: quotes are text (GLUE's and STS-B's files are written so)
    t.write_text('sentence1\tsentence2\tscore\n"A man\tsays "hi"\t1\nb\tc\t0\n')
    assert read_scored_pairs(t)[0] == [{"text1": '"A man', "text2": 'says "hi"', "score": 1.0},
                                       {"text1": "b", "text2": "c", "score": 0.0}]
    tt = tmp_path / "triplets.tsv"
    tt.write_text('query\tpositive\tnegative\n"q\tp "x"\tn\n')
    assert read_triplets(tt)[0]["query"] == '"q' and read_triplets(tt)[0]["positive"] == 'p "x"'
    a = tmp_path / "pairs.json"
    a.write_text(json.dumps([{"query": "q", "document": "d", "gold_score": 0.5}]))
    assert read_scored_pairs(a)[0] == [{"text1": "q", "text2": "d", "score": 0.5}]


def test_sick_test_pairs_read_without_a_split_are_announced(tmp_path, caplog):
    sick = tmp_path / "SICK.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tSemEval_set\n"
                    "1\ta\tb\t4.5\tTRAIN\n2\tc\td\t2\tTEST\n")
    with caplog.at_level("WARNING"):
        assert len(read_scored_pairs(sick)[0]) == 2
    assert "1 pairs of its SemEval_set column are TEST pairs" in caplog.text


def test_scored_pair_errors_name_the_file_and_line(tmp_path):
    c = tmp_path / "p.csv"
    for body, match in [
        ("sentence1,sentence2,score\na,b,1\nc,d,high\n", r"p.csv:3: the score 'high' is not a number"),
        ("sentence1,sentence2,score\na,b,1\nc,d,nan\n", r"p.csv:3: the score 'nan' is not a finite number"),
        ("sentence1,text,score\na,b,1\n", r"the header \(line 1: \['sentence1', 'text', 'score'\]\) has no second "
                                          "text column"),
        ("a,b,1\nc,d,2\n", r"has no first text column .*a file without a header line needs one"),
        ("sentence1,sentence2,score\na,b,1,2\n", r"p.csv:2: 4 fields for a header of 3; quote fields"),
        ("sentence1,sentence2,score\n", "no scored pairs"),
        ("sentence1,sentence2,score\na, ,1\n", r"p.csv:2: the second text \('sentence2'\) is empty"),
    ]:
        c.write_text(body)
        with pytest.raises(ValueError, match=match):
            read_scored_pairs(c)
    c.write_text("sentence1,sentence2,score\na,b,1\n")
    with pytest.raises(ValueError, match="split 'TRAIN' given, but the file has no split column"):
        read_scored_pairs(c, split="TRAIN")
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": True}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: the score True is a boolean"):
        read_scored_pairs(j)
    sts = tmp_path / "sts.csv"
    sts.write_text("g\tf\t2012\t0001\t4.0\tA b.\t\n")
    with pytest.raises(ValueError, match=r"pair 1: the second text \(.sentence2.\) is empty"):
        read_scored_pairs(sts)
    with pytest.raises(ValueError, match="an STS-B file holds one split"):
        read_scored_pairs(sts, split="train")
    (tmp_path / "p.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"expected an STS-B or SICK file, or a .jsonl, .json, .csv, .tsv or .txt"):
        read_scored_pairs(tmp_path / "p.parquet")
    rows = [{"text1": "a", "text2": "b", "score": 3.0}, {"text1": "c", "text2": "d", "score": 3.0}]
    with pytest.raises(ValueError, match="every pair has the score 3.0"):
        rescale_scores(rows, None, "f.csv")
    rows[1]["score"] = 0.5
    with pytest.raises(ValueError, match=r"score 3.0 lies outside the score range \[0.0, 1.0\]"):
        rescale_scores(rows, (0, 1), "f.csv")
    with pytest.raises(ValueError, match="the score range \\[5, 0\\] is empty or not finite"):
        rescale_scores(rows, (5, 0), "f.csv")


def test_triplet_fields_are_checked_when_read(tmp_path):
    """A bad value late in a file fails at read time with its line, not mid-training as an item of a batch."""
    f = tmp_path / "late.jsonl"
    rows = [{"anchor": f"q{i}", "positive": f"p{i}", "negative": f"n{i}"} for i in range(20)]
    rows[15]["positive"] = 12345
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"late.jsonl:16: the positive must be a string, got 12345"):
        read_triplets(f)
    rows[15]["positive"], rows[3]["anchor"] = "p15", ["x", "y"]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r'late.jsonl:4: the query must be a string, got \["x", "y"\]'):
        read_triplets(f)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("anchor,positive,negative\nHello, world,pos one,neg one\nq2,p2,n2\n")
    with pytest.raises(ValueError, match="ragged.csv:2: 4 fields for a header of 3; quote fields that hold"):
        read_triplets(ragged)
    ragged.write_text("anchor,positive,negative\na,b,c\nd,e\n")  # short: its hard negative would go missing
    with pytest.raises(ValueError, match="ragged.csv:3: 2 fields for a header of 3; every row needs all"):
        read_triplets(ragged)


def test_triplet_split_column_rules(tmp_path, caplog):
    nosplit = tmp_path / "nosplit.csv"
    nosplit.write_text("anchor,positive\nq1,p1\nq2,p2\n")
    with pytest.raises(ValueError, match="split 'train' given, but the file has no split column"):
        read_triplets(nosplit, split="train")
    f = tmp_path / "snli.csv"
    f.write_text("sent0,sent1,hard_neg,split\na,b,c,dev\nd,e,f,test\ng,h,i,dev\n")
    assert [r["query"] for r in read_triplets(f, split="DEV")] == ["a", "g"]  # split values in any letter case
    with pytest.raises(ValueError, match=r"no examples read for split 'train' \(the split column holds \['dev', "
                                         r"'test'\]\)"):
        read_triplets(f, split="train")
    with caplog.at_level("WARNING"):
        assert len(read_triplets(f)) == 3
    assert "1 examples of its split column are test rows, and no split was given" in caplog.text


def test_a_dataset_smaller_than_a_batch_is_named():
    data = {"big": [f"a{i}" for i in range(10)], "small": ["s0", "s1"]}
    with pytest.raises(ValueError, match=r"small \(2 examples\): fewer examples than one batch of 3"):
        one_dataset_per_batch(data, 3)


def test_text_readers_take_jsonl_text_and_refuse_tables(tmp_path):
    from llm2vec_fast.training.data import read_sentences

    f = tmp_path / "s.jsonl"
    f.write_text('{"text": " first "}\n\n{"text": "second", "id": 2}\n')
    assert read_sentences(f) == read_documents(f) == ["first", "second"]
    f.write_text('{"text": "ok"}\n{"sentence": "no text field"}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:2: expected an object with a 'text' string"):
        read_sentences(f)
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,b\n")
    with pytest.raises(ValueError, match=r"t.csv: a .csv file, where plain text is expected"):
        read_documents(table)
