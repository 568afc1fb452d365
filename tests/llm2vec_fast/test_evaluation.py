"""Evaluation: file readers, metrics against hand-computed cases, result layout, CLI = Python API, real model."""
import argparse
import json
import math
import zlib

import numpy as np
import pytest

from llm2vec_fast import evaluation as ev


class FakeEncoder:
    """Deterministic bag-of-words hashing encoder with the LLM2Vec.encode signature; records what it was given."""

    def __init__(self, dim=64):
        self.dim = dim
        self.calls = []

    def encode(self, sentences, batch_size=32, show_progress_bar=True, convert_to_numpy=False,
               convert_to_tensor=False, device=None, normalize_embeddings=False, max_batch_tokens=None):
        self.calls.append(list(sentences))
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, item in enumerate(sentences):
            text = item[1] if isinstance(item, list) else item
            for w in text.lower().split():
                out[i, zlib.crc32(w.strip(".,?!").encode()) % self.dim] += 1
        return out


# ---------------------------------------------------------------------- STS
def test_load_stsb_dev_handles_extra_columns(data_dir):
    s1, s2, gold = ev.load_sts(data_dir / "stsb" / "sts-dev.csv")
    assert len(s1) == len(s2) == len(gold) == 1500
    assert s1[0] == "A man with a hard hat is dancing." and gold[0] == 5.0
    assert gold.min() >= 0 and gold.max() <= 5


def test_load_sick_trial(data_dir):
    s1, s2, gold = ev.load_sts(data_dir / "sick" / "SICK_trial.txt")
    assert len(gold) == 500
    assert s2[0] == "There is no boy playing outdoors and there is no man smiling" and gold[0] == 3.6


def test_inputs_of_the_wrong_kind_say_so(tmp_path):
    """A path that exists but is a folder where a file is read (or the reverse) is named as such, not as missing."""
    f = tmp_path / "a.csv"
    f.write_text("text,label\nx,1\n")
    for load, what in [(ev.load_sts, "STS data file"), (ev.load_classification, "classification data file"),
                       (ev.load_reranking, "reranking data")]:
        with pytest.raises(IsADirectoryError, match=f"{what} '{tmp_path}' is a folder; expected a"):
            load(tmp_path)
        with pytest.raises(FileNotFoundError, match=f"{what} '{tmp_path / 'nope'}' not found"):
            load(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match=r"retrieval data folder '.*a.csv' is a file; expected a BEIR folder"):
        ev.load_beir(f)


def test_load_sts_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("g\tf\t2012\t0001\t4.0\ta\tb\ng\tf\t2012\t0002\tfour\ta\tb\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: score column 5 is not a number: 'four'"):
        ev.load_sts(bad)
    short = tmp_path / "short.tsv"
    short.write_text("g\tf\t2012\t0001\t4.0\tonly one sentence\n")
    with pytest.raises(ValueError, match=r"short.tsv:1: expected at least 7 tab-separated columns, got 6"):
        ev.load_sts(short)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        ev.load_sts(tmp_path / "nope.tsv")


def test_sts_scores_perfect_and_inverted():
    gold = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    angles = gold / 5 * (np.pi / 2)  # cosine falls as gold rises
    e1 = np.tile([[1.0, 0.0]], (5, 1))
    e2 = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    s = ev.sts_scores(e1, e2, gold)
    assert s["spearman"] == pytest.approx(-1.0) and s["main_score"] == s["cosine_spearman"] == s["spearman"]
    s = ev.sts_scores(e1, e2, -gold)
    assert s["spearman"] == pytest.approx(1.0) and s["pearson"] > 0.9


def test_evaluate_sts_encodes_each_sentence_once_and_layout(tmp_path):
    data = tmp_path / "sts.tsv"
    rows = [("a cat sits", "a cat sits", 5.0), ("a cat sits", "a dog runs", 1.0), ("red car", "red car fast", 4.0),
            ("blue sky", "green grass", 0.0)]
    data.write_text("".join(f"g\tf\ty\t{i}\t{sc}\t{a}\t{b}\textra\n" for i, (a, b, sc) in enumerate(rows)))
    enc = FakeEncoder()
    r = ev.evaluate_sts(enc, data, instruction="Retrieve similar text:")
    assert len(enc.calls) == 1
    sent = enc.calls[0]
    assert len(sent) == 6 and all(isinstance(x, list) and x[0] == "Retrieve similar text:" for x in sent)
    assert r["task_name"] == "STSBenchmark" and set(r["scores"]) == {"test"}
    e = r["scores"]["test"][0]
    assert e["hf_subset"] == "default" and e["languages"] == ["eng-Latn"]
    assert e["main_score"] == e["cosine_spearman"] and e["main_score"] > 0.5
    assert r["llm2vec_fast"]["n_pairs"] == 4 and r["evaluation_time"] >= 0
    json.dumps(r)  # serializable


def test_result_reads_as_mteb_task_result(tmp_path):
    mteb_results = pytest.importorskip("mteb.results")
    data = tmp_path / "sts.tsv"
    data.write_text("g\tf\ty\t0\t5\ta b\ta b\ng\tf\ty\t1\t0\ta b\tc d\ng\tf\ty\t2\t3\ta b c\ta b d\n")
    r = ev.evaluate_sts(FakeEncoder(), data)
    tr = mteb_results.TaskResult.from_dict(r)
    assert tr.get_score() == pytest.approx(r["scores"]["test"][0]["main_score"])


# ---------------------------------------------------------------------- retrieval metrics
def test_metrics_hand_computed():
    ranked = ["a", "b", "c", "d"]
    rels = {"b": 2, "d": 1, "e": 1, "z": 0}
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ev.ndcg_at_k(ranked, rels, 10) == pytest.approx(dcg / idcg)
    assert ev.ndcg_at_k(ranked, rels, 1) == 0.0
    assert ev.ndcg_at_k(["b", "d", "e"], rels, 10) == pytest.approx(1.0)
    assert ev.mrr_at_k(ranked, rels, 10) == 0.5
    assert ev.mrr_at_k(ranked, rels, 1) == 0.0
    assert ev.mrr_at_k(ranked, rels, 10, relevance_threshold=2) == 0.5
    assert ev.mrr_at_k(["d", "b"], rels, 10, relevance_threshold=2) == 0.5
    assert ev.recall_at_k(ranked, rels, 100) == pytest.approx(2 / 3)
    assert ev.recall_at_k(ranked, rels, 2) == pytest.approx(1 / 3)
    assert ev.recall_at_k(ranked, rels, 100, relevance_threshold=2) == 1.0
    assert ev.recall_at_k(ranked, {"x": 0}, 100) == 0.0


def test_retrieval_scores_average_and_skip_unjudged():
    rankings = {"q1": ["a", "b"], "q2": ["c", "d"], "q3": ["a"]}
    qrels = {"q1": {"a": 1}, "q2": {"d": 1}, "q3": {"a": 0}}  # q3 has no relevant document: skipped
    s = ev.retrieval_scores(rankings, qrels)
    assert s["mrr_at_10"] == pytest.approx((1 + 0.5) / 2)
    assert s["recall_at_100"] == 1.0
    assert s["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(3)) / 2) == s["main_score"]
    with pytest.raises(ValueError, match="no query has a relevant document"):
        ev.retrieval_scores({"q3": ["a"]}, qrels)


def test_metrics_match_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(150)]
    qrels, run, rankings = {}, {}, {}
    for q in range(20):
        judged = rng.choice(150, size=12, replace=False)
        qrels[f"q{q}"] = {docs[j]: int(rng.integers(0, 3)) for j in judged}
        qrels[f"q{q}"][docs[judged[0]]] = 2  # at least one relevant
        scores = rng.normal(size=150)
        order = np.argsort(-scores)
        rankings[f"q{q}"] = [docs[j] for j in order]
        run[f"q{q}"] = {docs[j]: float(scores[j]) for j in order[:100]}
    ours = ev.retrieval_scores({q: r[:100] for q, r in rankings.items()}, qrels)
    te = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recip_rank", "recall.100"})
    res = te.evaluate(run)
    assert ours["ndcg_at_10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in res.values()]), abs=1e-9)
    assert ours["recall_at_100"] == pytest.approx(np.mean([v["recall_100"] for v in res.values()]), abs=1e-9)
    mrr10 = np.mean([ev.mrr_at_k(rankings[q], qrels[q], 10) for q in qrels])
    assert ours["mrr_at_10"] == pytest.approx(mrr10)


def test_rank_cosine_and_stable_ties():
    q = np.array([[1.0, 0.0]])
    d = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    assert ev.rank(q, d, ["w", "x", "y", "z"], top_k=3) == [["x", "z", "y"]]


# ---------------------------------------------------------------------- BEIR files
@pytest.mark.parametrize("name, n_qrels", [("msmarco", 4102), ("dbpedia", 3709)])
def test_load_beir_mini_sets(data_dir, name, n_qrels):
    corpus, queries, qrels = ev.load_beir(data_dir / "mini_retrieval" / name)
    assert len(corpus) == 5000 and len(queries) == 50  # msmarco passages hold U+2028: split on "\n" only
    assert sum(len(v) for v in qrels.values()) == n_qrels
    if name == "dbpedia":
        assert corpus["<dbpedia:Oceanic_Airlines>"].startswith("Oceanic Airlines Oceanic Airlines and less")
    small = ev.subsample_beir(corpus, queries, qrels, max_docs=300, max_queries=10)
    c2, q2, r2 = small
    assert len(q2) == 10 and len(c2) >= 300
    assert all(d in c2 for q in q2 for d, s in qrels[q].items() if s >= 1)
    assert r2 == {q: qrels[q] for q in q2}  # whole qrels: judgments outside the slice still count as trec_eval's
    if name == "dbpedia":  # 0-graded judgments are not forced in: the slice stays small
        assert len(c2) == 300
    assert small == ev.subsample_beir(corpus, queries, qrels, max_docs=300, max_queries=10)


def _write_beir(folder):
    (folder / "qrels").mkdir(parents=True)
    docs = [("d1", "Cats", "cats purr softly"), ("d2", "", "dogs bark loudly"), ("d3", "Fish", "fish swim deep"),
            ("d4", "", "birds sing\u2028at dawn")]
    (folder / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": i, "title": t, "text": x})
                                                   for i, t, x in docs) + "\n")
    qs = [("q1", "why do cats purr"), ("q2", "fish swim"), ("q3", "unjudged question")]
    (folder / "queries.jsonl").write_text("\n".join(json.dumps({"_id": i, "text": x}) for i, x in qs))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td3\t2\nq2\td2\t0\n")


def test_evaluate_retrieval_instruction_on_queries_only(tmp_path):
    _write_beir(tmp_path / "toy")
    enc = FakeEncoder()
    r = ev.evaluate_retrieval(enc, tmp_path / "toy", instruction="Find it")
    docs_call, query_call = enc.calls
    assert docs_call == ["Cats cats purr softly", "dogs bark loudly", "Fish fish swim deep", "birds sing\u2028at dawn"]
    assert query_call == [["Find it", "why do cats purr"], ["Find it", "fish swim"]]
    e = r["scores"]["test"][0]
    assert e["ndcg_at_10"] == e["mrr_at_10"] == e["recall_at_100"] == e["main_score"] == 1.0
    assert r["llm2vec_fast"]["n_queries"] == 2 and r["task_name"] == "toy-local"
    enc2 = FakeEncoder()
    ev.evaluate_retrieval(enc2, tmp_path / "toy", instruction="")
    assert enc2.calls[1] == ["why do cats purr", "fish swim"]


def test_retrieval_scores_qrels_as_trec_eval_does(tmp_path, caplog):
    """A relevant document missing from the corpus still counts in the ideal ranking and in recall, and a query
    whose relevant documents are all missing scores 0 (trec_eval, and so mteb, on the same rankings); both are
    named in a warning and recorded."""
    _write_beir(tmp_path / "toy")
    qrels = tmp_path / "toy" / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q1\tdGONE\t1\nq3\tdLOST\t2\n")
    with caplog.at_level("WARNING"):
        r = ev.evaluate_retrieval(FakeEncoder(), tmp_path / "toy", instruction="")
    e, info = r["scores"]["test"][0], r["llm2vec_fast"]
    assert "the qrels name 2 documents missing from the corpus (e.g. 'dGONE', 'dLOST')" in caplog.text
    assert info["n_queries"] == 3 and info["qrels_docs_missing_from_corpus"] == 2
    q1 = ev.ndcg_at_k(["d1"], {"d1": 1, "dGONE": 1})  # d1 first (the toy's one match), dGONE never retrieved
    assert q1 == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert e["ndcg_at_10"] == pytest.approx((q1 + 1.0 + 0.0) / 3)
    assert e["recall_at_100"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    pytrec_eval = pytest.importorskip("pytrec_eval")
    run = {q: {d: float(-i) for i, d in enumerate(docs)} for q, docs in
           {"q1": ["d1", "d2", "d3", "d4"], "q2": ["d3", "d1", "d2", "d4"], "q3": ["d1", "d2", "d3", "d4"]}.items()}
    want = pytrec_eval.RelevanceEvaluator(ev.load_beir(tmp_path / "toy")[2], {"ndcg_cut.10"}).evaluate(run)
    assert np.mean([v["ndcg_cut_10"] for v in want.values()]) == pytest.approx(e["ndcg_at_10"])


def test_headerless_qrels_with_a_decimal_score_keep_their_first_row(tmp_path):
    _write_beir(tmp_path / "toy")
    (tmp_path / "toy" / "qrels" / "test.tsv").write_text("q1\td1\t2.0\nq2\td3\t1\n")
    assert ev.load_beir(tmp_path / "toy")[2] == {"q1": {"d1": 2}, "q2": {"d3": 1}}


def test_a_threshold_no_qrels_reach_is_named(tmp_path):
    _write_beir(tmp_path / "toy")
    enc = FakeEncoder()
    with pytest.raises(ValueError, match=r"relevance-threshold 3 in the qrels \(highest score there: 2\)"):
        ev.evaluate_retrieval(enc, tmp_path / "toy", relevance_threshold=3)
    assert enc.calls == []  # refused before encoding


def test_load_beir_errors(tmp_path):
    _write_beir(tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match="qrels"):
        ev.load_beir(tmp_path / "toy", split="dev")
    (tmp_path / "toy" / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{broken\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not valid JSON"):
        ev.load_beir(tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match="missing"):
        ev.load_beir(tmp_path / "missing")


# ---------------------------------------------------------------------- classification
def test_load_banking77_and_split(data_dir):
    texts, labels = ev.load_classification(data_dir / "banking77" / "train.csv")
    assert len(texts) == 10003 and len(set(labels)) == 77
    a = ev.split_rows(texts, labels, n_train=400, n_test=200, seed=0)
    assert len(a[0]) == 400 and len(a[2]) == 200 and not set(a[0]) & set(a[2]) - {"_"}
    assert a == ev.split_rows(texts, labels, n_train=400, n_test=200, seed=0)
    assert a[0] != ev.split_rows(texts, labels, n_train=400, n_test=200, seed=1)[0]
    with pytest.raises(ValueError, match="cannot take 10000 train \\+ 200 test rows from 10003"):
        ev.split_rows(texts, labels, n_train=10000, n_test=200)


def test_classification_empty_and_unseen_labels(tmp_path, caplog):
    f = tmp_path / "x.csv"
    f.write_text("text,label\na cat,pets\nbad row,\n")
    with pytest.raises(ValueError, match=r"x.csv:3: the label column \('label'\) is empty"):
        ev.load_classification(f)
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"cat {i},pets\ncar {i},cars\n" for i in range(6)))
    test.write_text("text,label\ncat x,pets\nboat y,boats\n,cars\n")
    with caplog.at_level("WARNING"):
        r = ev.evaluate_classification(FakeEncoder(), train, test)
    assert "1 test rows have a label the training part lacks ('boats')" in caplog.text
    assert "1 of 3 texts are empty" in caplog.text
    assert r["llm2vec_fast"]["n_test_unseen_labels"] == 1


def test_load_classification_errors(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("sentence,topic\na,b\n")
    with pytest.raises(ValueError, match="must name a text column"):
        ev.load_classification(f)
    f.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows after the header"):
        ev.load_classification(f)


def _write_cls(path, n, seed):
    rng = np.random.default_rng(seed)
    words = {"sports": ["goal", "match", "team", "score"], "food": ["pizza", "bread", "soup", "cheese"],
             "tech": ["laptop", "code", "chip", "server"]}
    lines = ["text,label"]
    for _ in range(n):
        lab = rng.choice(list(words))
        lines.append(f"\"I like the {' '.join(rng.choice(words[lab], 2))}, really\",{lab}")
    path.write_text("\n".join(lines) + "\n")


def test_evaluate_classification_separable(tmp_path):
    pytest.importorskip("sklearn")
    _write_cls(tmp_path / "train.csv", 60, 0)
    _write_cls(tmp_path / "test.csv", 30, 1)
    r = ev.evaluate_classification(FakeEncoder(), tmp_path / "train.csv", tmp_path / "test.csv")
    e = r["scores"]["test"][0]
    assert e["accuracy"] == e["main_score"] == 1.0 and e["f1"] == 1.0
    r2 = ev.evaluate_classification(FakeEncoder(), tmp_path / "train.csv", n_train=40, n_test=20, seed=3)
    assert r2["llm2vec_fast"]["n_train"] == 40 and r2["llm2vec_fast"]["n_test"] == 20


# ---------------------------------------------------------------------- CLI
def _parser():
    p = argparse.ArgumentParser(prog="llm2vec-fast")
    ev.add_subcommands(p.add_subparsers(dest="command"))
    return p


def test_cli_sts_matches_api(data_dir, tmp_path, capsys):
    data = data_dir / "sick" / "SICK_trial.txt"
    out = tmp_path / "res" / "sick.json"
    args = _parser().parse_args(["eval", "sts", "--data", str(data), "--limit", "60", "--output", str(out)])
    assert args.func(args, model=FakeEncoder()) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    api = ev.evaluate_sts(FakeEncoder(), data, limit=60)
    saved = json.loads(out.read_text())
    assert saved["scores"] == api["scores"] and saved["task_name"] == "SICK-R"
    assert printed[-1] == f"{api['scores']['validation'][0]['main_score']:.6f}"
    assert "| SICK-R | validation | cosine_spearman |" in "\n".join(printed)
    assert out.with_suffix(".md").read_text().startswith("# SICK-R")


def test_cli_output_path_is_checked_before_encoding(tmp_path):
    _write_beir(tmp_path / "toy")
    (tmp_path / "taken").mkdir()
    enc = FakeEncoder()
    args = _parser().parse_args(["eval", "retrieval", "--data", str(tmp_path / "toy"), "--output",
                                 str(tmp_path / "taken")])
    with pytest.raises(ValueError, match="--output .*taken' is a folder; expected a file path"):
        args.func(args, model=enc)
    (tmp_path / "file").write_text("x")
    args.output = str(tmp_path / "file" / "r.json")
    with pytest.raises(ValueError, match="is not a folder"):
        args.func(args, model=enc)
    args.output = str(tmp_path / "r.md")  # the JSON and its summary would be one file
    with pytest.raises(ValueError, match="the result is JSON and its markdown summary is written beside it"):
        args.func(args, model=enc)
    args.output = " "
    with pytest.raises(ValueError, match="--output needs a file path"):
        args.func(args, model=enc)
    assert enc.calls == []
    # a write that fails anyway (here: the target became a folder meanwhile) leaves no temporary file behind
    with pytest.raises(OSError):
        ev.save_result({"task_name": "t", "scores": {}}, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken", "toy"]


def test_split_names_as_mteb_records_them(tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("".join(f"g\tf\t2012\t{i}\t{i % 5}.0\tw{i} a\tw{i} b\n" for i in range(6)))
    for given, recorded in (("dev", "validation"), ("valid", "validation"), ("test", "test"), (None, "test")):
        assert list(ev.evaluate_sts(FakeEncoder(), data, split=given)["scores"]) == [recorded]
    (tmp_path / "header.tsv").write_text("genre\tfile\tyear\tid\tscore\ts1\ts2\n")
    with pytest.raises(ValueError, match=r"header.tsv:1: score column 5 is not a number: 'score' \(STS-B files have "
                                         r"no header line\)"):
        ev.load_sts(tmp_path / "header.tsv")


def test_pair_rows_with_extra_fields_are_refused(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("sentence1,sentence2,label\nA kid eats,Someone eats,1\nA kid eats,Someone eats,1,extra\n")
    with pytest.raises(ValueError, match=r"p.csv:3: the row has more fields than the header \(4 for 3\)"):
        ev.load_pairs(f)
    f.write_text("sentence1,sentence2,label\nA kid eats,Someone eats,1\nA kid eats,1\n")
    with pytest.raises(ValueError, match=r"p.csv:3: the row has fewer fields than the header \(2 for 3\)"):
        ev.load_pairs(f)


def test_cli_retrieval_and_classification_parse(tmp_path, capsys):
    pytest.importorskip("sklearn")
    _write_beir(tmp_path / "toy")
    args = _parser().parse_args(["eval", "retrieval", "--data", str(tmp_path / "toy"), "--instruction", ""])
    args.func(args, model=FakeEncoder())
    assert capsys.readouterr().out.strip().split("\n")[-1] == "1.000000"
    _write_cls(tmp_path / "train.csv", 60, 0)
    args = _parser().parse_args(["eval", "classification", "--data", str(tmp_path / "train.csv"), "--n-train", "40",
                                 "--n-test", "20", "--seed", "2"])
    assert args.eval_task == "classification" and args.pooling is None and not args.no_bidirectional
    args.func(args, model=FakeEncoder())
    api = ev.evaluate_classification(FakeEncoder(), tmp_path / "train.csv", n_train=40, n_test=20, seed=2)
    assert capsys.readouterr().out.strip().split("\n")[-1] == f"{api['scores']['test'][0]['main_score']:.6f}"


def test_cli_requires_task_and_data():
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "sts"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "sts", "--data", "x", "--pooling", "max"])


def test_cli_loads_model_from_flags(tiny_encoder_dir, data_dir, capsys):
    """The CLI path end to end on a tiny random model: --model, --pooling, --no-bidirectional reach from_pretrained."""
    from llm2vec_fast import LLM2Vec

    data = data_dir / "stsb" / "sts-dev.csv"
    args = _parser().parse_args(["eval", "sts", "--data", str(data), "--limit", "12", "--model", str(tiny_encoder_dir),
                                 "--pooling", "weighted_mean", "--no-bidirectional", "--device", "cpu",
                                 "--dtype", "float32"])
    assert args.func(args) == 0
    last = float(capsys.readouterr().out.strip().split("\n")[-1])
    ref = LLM2Vec.from_pretrained(str(tiny_encoder_dir), pooling_mode="weighted_mean", enable_bidirectional=False,
                                  device="cpu", dtype="float32")
    api = ev.evaluate_sts(ref, data, limit=12)["scores"]["validation"][0]["main_score"]
    assert last == pytest.approx(api, abs=1e-6)


# ---------------------------------------------------------------------- real default model (small subsets)
@pytest.fixture(scope="module")
def real_model():
    from .real_model_eval import default_model

    return default_model()


@pytest.mark.slow
def test_real_model_sts_b_dev_subset(real_model, data_dir, capsys):
    data = data_dir / "stsb" / "sts-dev.csv"
    r = ev.evaluate_sts(real_model, data, limit=100)
    e = r["scores"]["validation"][0]
    # SmolLM2-135M made bidirectional without MNTP training, mean pooling: measured Spearman 0.130, Pearson 0.085 on
    # these 100 pairs (fp32, CPU). Weak, as the LLM2Vec paper finds for untrained bidirectional models; the band
    # guards the evaluation path (a broken pairing or ordering lands near 0 or flips sign).
    assert 0.08 < e["cosine_spearman"] < 0.2 and 0.03 < e["cosine_pearson"] < 0.15
    args = _parser().parse_args(["eval", "sts", "--data", str(data), "--limit", "100"])
    args.func(args, model=real_model)
    assert capsys.readouterr().out.strip().split("\n")[-1] == f"{e['main_score']:.6f}"


@pytest.mark.slow
def test_real_model_retrieval_subset(real_model, data_dir):
    r = ev.evaluate_retrieval(real_model, data_dir / "mini_retrieval" / "dbpedia", max_docs=200, max_queries=6,
                              instruction="Given a query, retrieve relevant entity descriptions from DBPedia")
    e = r["scores"]["test"][0]
    assert r["llm2vec_fast"]["n_docs"] == 200 and r["llm2vec_fast"]["n_queries"] == 6
    # measured nDCG@10 0.347, MRR@10 0.722, Recall@100 0.737; a random ranking of 200 docs scores ~0.05 nDCG@10
    assert 0.2 < e["ndcg_at_10"] < 0.5 and 0.45 < e["mrr_at_10"] <= 1 and 0.5 < e["recall_at_100"] < 0.95


@pytest.mark.slow
def test_real_model_banking77_subset(real_model, data_dir):
    pytest.importorskip("sklearn")
    r = ev.evaluate_classification(real_model, data_dir / "banking77" / "train.csv", n_train=400, n_test=200, seed=0)
    e = r["scores"]["test"][0]
    # measured accuracy 0.310, macro-F1 0.222 (400 train / 200 test rows, seed 0); chance is 1/77
    assert 0.2 < e["accuracy"] < 0.45 and 0.1 < e["f1"] < 0.35


def test_sts_split_from_file_name_and_count_checks(tmp_path):
    assert [ev.sts_split(n) for n in ("sts-dev.csv", "SICK_trial.txt", "sts-train.csv", "sts-test.csv", "x.tsv",
                                      "valid.tsv")] == ["validation", "validation", "train", "test", "test",
                                                        "validation"]
    data = tmp_path / "sts-dev.tsv"
    data.write_text("g\tf\ty\t0\t5\ta b\ta b\ng\tf\ty\t1\t0\ta b\tc d\ng\tf\ty\t2\t3\ta b c\ta b d\n")
    assert set(ev.evaluate_sts(FakeEncoder(), data)["scores"]) == {"validation"}
    assert set(ev.evaluate_sts(FakeEncoder(), data, split="test")["scores"]) == {"test"}
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match=f"limit must be a positive int or None, got {bad!r}"):
            ev.evaluate_sts(FakeEncoder(), data, limit=bad)
    with pytest.raises(ValueError, match="max_docs must be a positive int or None, got -1"):
        ev.subsample_beir({}, {}, {}, max_docs=-1)


class PrefixEncoder(FakeEncoder):
    """The fake encoder's first ``keep`` columns only: what scoring at truncate_dim must equal."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def encode(self, sentences, **kw):
        return super().encode(sentences, **kw)[:, :self.keep]


def test_truncate_dim_scores_the_prefix(data_dir, tmp_path, capsys):
    """Every task at truncate_dim=d equals the same task on an encoder whose embeddings are only the first d
    columns (and differs from the full width); d above the width or below 1 is refused; the CLI passes it."""
    pytest.importorskip("sklearn")
    data = data_dir / "sick" / "SICK_trial.txt"
    full = ev.evaluate_sts(FakeEncoder(), data, limit=80)["scores"]["validation"][0]["main_score"]
    cut = ev.evaluate_sts(FakeEncoder(), data, limit=80, truncate_dim=9)
    want = ev.evaluate_sts(PrefixEncoder(9), data, limit=80)["scores"]["validation"][0]["main_score"]
    assert cut["scores"]["validation"][0]["main_score"] == want != full
    assert cut["llm2vec_fast"]["truncate_dim"] == 9
    _write_beir(tmp_path / "toy")
    assert ev.evaluate_retrieval(FakeEncoder(), tmp_path / "toy", truncate_dim=5)["scores"] == \
        ev.evaluate_retrieval(PrefixEncoder(5), tmp_path / "toy")["scores"]
    _write_cls(tmp_path / "train.csv", 60, 0)
    assert ev.evaluate_classification(FakeEncoder(), tmp_path / "train.csv", truncate_dim=7)["scores"] == \
        ev.evaluate_classification(PrefixEncoder(7), tmp_path / "train.csv")["scores"]
    with pytest.raises(ValueError, match="truncate_dim 65 is more than the embedding width 64"):
        ev.evaluate_sts(FakeEncoder(), data, limit=10, truncate_dim=65)
    with pytest.raises(ValueError, match="truncate_dim"):
        ev.evaluate_sts(FakeEncoder(), data, limit=10, truncate_dim=0)
    args = _parser().parse_args(["eval", "sts", "--data", str(data), "--limit", "80", "--truncate-dim", "9"])
    args.func(args, model=FakeEncoder())
    assert capsys.readouterr().out.strip().split("\n")[-1] == f"{want:.6f}"


def test_truncate_dim_wider_than_the_encoder_is_refused_before_encoding(data_dir):
    enc = FakeEncoder()
    enc.get_sentence_embedding_dimension = lambda: 64
    with pytest.raises(ValueError, match="truncate_dim 65 is more than the embedding width 64"):
        ev.evaluate_sts(enc, data_dir / "sick" / "SICK_trial.txt", limit=10, truncate_dim=65)
    assert enc.calls == []


# ---------------------------------------------------------------------- pair classification
def test_threshold_metrics_hand_computed():
    pytest.importorskip("sklearn")
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): the best cut is above 0.9 or between 0.7 and 0.1 (3 of 4)
    m = ev.threshold_metrics([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0])
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(0.8) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 1.0 and m["ap"] == pytest.approx((1 + 2 / 3) / 2)
    # distances: lower is more similar, the same order
    assert ev.threshold_metrics([0.1, 0.2, 0.3, 0.9], [1, 0, 1, 0], higher_is_similar=False) == m
    # a tie is never split: with all scores equal no threshold exists
    assert ev.threshold_metrics([0.5, 0.5, 0.5], [1, 0, 1])["accuracy"] == 0.0


def test_pair_classification_scores_equal_mteb():
    """All 30 metrics (5 similarity functions × accuracy, F1, precision, recall, AP, and the max_ of each) equal
    mteb's own PairClassification computation on the same embeddings, ties included."""
    pytest.importorskip("sklearn")
    mteb = pytest.importorskip("mteb")
    from sklearn.metrics.pairwise import (
        paired_cosine_distances,
        paired_euclidean_distances,
        paired_manhattan_distances,
    )

    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    y = (rng.random(300) < 0.4).astype(np.int64)
    e2[y == 1] = e1[y == 1] + 0.8 * rng.normal(size=(int(y.sum()), 16))
    e1[:5], e2[:5] = e1[0], e2[0]  # tied scores
    e2[5:11] = e1[5:11]  # texts paired with themselves: cosine 1 exactly, a tie only if computed as MTEB does
    e1, e2 = e1.astype(np.float32), e2.astype(np.float32)  # what _embed returns
    try:
        task = mteb.get_task("TwitterSemEval2015")
        compute = task._compute_metrics
    except (AttributeError, KeyError, ValueError) as e:
        pytest.skip(f"this mteb has no PairClassification metrics entry point: {e}")
    cos = 1 - paired_cosine_distances(e1, e2)
    theirs = compute({"similarity_scores": cos, "cosine_scores": cos,
                      "manhattan_distances": paired_manhattan_distances(e1, e2),
                      "euclidean_distances": paired_euclidean_distances(e1, e2), "dot_scores": (e1 * e2).sum(1)},
                     y.tolist())
    ours = ev.pair_classification_scores(e1, e2, y)
    assert len(theirs) == 30 and ours["main_score"] == ours["max_ap"]
    for k, v in theirs.items():
        assert ours[k] == v, k


def test_load_pairs_senteval_and_files(data_dir, tmp_path):
    s1, s2, y, left_out = ev.load_pairs(data_dir / "snli", "dev")
    assert (len(s1), int(y.sum()), left_out) == (6607, 3329, 3235)  # entailment vs contradiction, neutral left out
    assert s1[0] == "Two women are embracing while holding to go packages ."
    assert s2[0] == "Two woman are holding packages ."
    assert y[0] == 1 and y[1] == 0
    c = tmp_path / "p.csv"
    c.write_text("Premise,Hypothesis,Labels\na b,c,entailment\nd,e,NEUTRAL\nf,g,0.0\nh,i,True\nj,k,not_entailment\n")
    a, b, y, left_out = ev.load_pairs(c)
    assert (a, b, y.tolist(), left_out) == (["a b", "f", "h", "j"], ["c", "g", "i", "k"], [1, 0, 1, 0], 1)
    t = tmp_path / "p.tsv"  # GLUE-style TSV: quotes are text
    t.write_text('sentence1\tsentence2\tlabel\n"A man\tHello\t1\nx\ty\t0\nSo" he said\tHe said "stop"\t1\n')
    a, b, y, _ = ev.load_pairs(t)
    assert a == ['"A man', "x", 'So" he said'] and b[2] == 'He said "stop"' and y.tolist() == [1, 0, 1]
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"sentence1": "x", "sentence2": "y", "label": True}) + "\n"
                 + json.dumps({"sentence1": "z", "sentence2": "w", "label": 0}) + "\n")
    a, b, y, _ = ev.load_pairs(j)
    assert (a, b, y.tolist()) == (["x", "z"], ["y", "w"], [1, 0])


def test_load_pairs_errors(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split 'train'.*splits here: \['dev', 'test'\]"):
        ev.load_pairs(data_dir / "snli", "train")
    c = tmp_path / "p.csv"
    for body, match in [
        ("sentence1,sentence2,label\na,b,maybe\n", r"p.csv:2: label 'maybe' is neither positive"),
        ("sentence1,sentence2,label\na,b,1\nc,d,1\n", "needs positive and negative pairs, got 2 positive and 0 "
                                                     "negative"),
        ("sentence1,other,label\na,b,1\n", "p.csv:2: a row needs two texts"),
        ("sentence1,sentence2,label\n,b,1\n", r"p.csv:2: both texts must be non-empty strings, got \['', 'b'\]"),
    ]:
        c.write_text(body)
        with pytest.raises(ValueError, match=match):
            ev.load_pairs(c)
    d = tmp_path / "senteval"
    d.mkdir()
    (d / "s1.dev").write_text("a\nb\n")
    (d / "s2.dev").write_text("c\n")
    (d / "labels.dev").write_text("entailment\ncontradiction\n")
    with pytest.raises(ValueError, match=r"different line counts \[2, 1, 2\]"):
        ev.load_pairs(d, "dev")


def test_cli_pair_classification_matches_api(data_dir, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "snli.json"
    args = _parser().parse_args(["eval", "pair-classification", "--data", str(data_dir / "snli"), "--split", "dev",
                                 "--limit", "300", "--output", str(out)])
    assert args.func(args, model=FakeEncoder()) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    api = ev.evaluate_pair_classification(FakeEncoder(), data_dir / "snli", split="dev", limit=300)
    saved = json.loads(out.read_text())
    e = api["scores"]["validation"][0]
    assert saved["scores"] == api["scores"] and saved["task_name"] == "snli-pairs"
    assert printed[-1] == f"{e['main_score']:.6f}" and "| snli-pairs | validation | max_ap |" in "\n".join(printed)
    # word overlap separates entailed from contradicting hypotheses better than chance (AP of a random scorer ~0.5)
    assert api["llm2vec_fast"]["n_pairs"] == 300 and 0.55 < e["max_ap"] <= 1
    mteb = pytest.importorskip("mteb")
    assert mteb.TaskResult.from_dict(saved).task_name == "snli-pairs"
    # a pair file: --split names the recorded split
    c = tmp_path / "p.csv"
    c.write_text("sentence1,sentence2,label\n" + "".join(f"a{i} b,a{i} c,{i % 2}\n" for i in range(10)))
    assert list(ev.evaluate_pair_classification(FakeEncoder(), c, split="dev")["scores"]) == ["validation"]
    assert list(ev.evaluate_pair_classification(FakeEncoder(), c)["scores"]) == ["test"]


def test_non_finite_embeddings_are_named():
    class NaNEncoder(FakeEncoder):
        def encode(self, sentences, **kw):
            out = super().encode(sentences, **kw)
            out[1, 0] = np.nan
            return out

    with pytest.raises(ValueError, match=r"NaN or infinite embeddings for 1 of 3 texts, first row 1: 'b'"):
        ev._embed(NaNEncoder(), ["a", "b", "c"])


# ---------------------------------------------------------------------- clustering
def test_clustering_scores_equal_mteb():
    """The same V-measure and AMI, experiment by experiment, as mteb's bootstrapped clustering with the same seed."""
    pytest.importorskip("sklearn")
    try:
        from mteb.abstasks.clustering import _evaluate_clustering_bootstrapped
    except ImportError as e:
        pytest.skip(f"this mteb has no bootstrapped clustering function: {e}")
    import random

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=400)
    emb = rng.normal(size=(400, 8)) + 3.0 * np.eye(8)[labels]
    ours = ev.clustering_scores(emb, labels, n_experiments=4, cluster_size=300, seed=7)
    theirs, _ = _evaluate_clustering_bootstrapped(emb, [[x] for x in labels], n_clusters=4, cluster_size=300,
                                                  kmean_batch_size=512, max_depth=None,
                                                  rng_state=random.Random(7), seed=7)
    assert ours["v_measures"]["Level 0"] == pytest.approx(theirs["v_measure"]["Level 0"], abs=1e-12)
    assert ours["ami_scores"]["Level 0"] == pytest.approx(theirs["ami"]["Level 0"], abs=1e-12)
    assert 0.3 < ours["main_score"] == ours["v_measure"] < 1
    from mteb.abstasks.clustering import AbsTaskClustering

    assert getattr(AbsTaskClustering, "max_documents_per_cluster", ev.CLUSTER_SIZE) == ev.CLUSTER_SIZE


def test_evaluate_clustering_and_cli(tmp_path, capsys):
    """Texts whose words name their cluster cluster perfectly; the CLI prints the API's score; bad input is refused."""
    pytest.importorskip("sklearn")
    path = tmp_path / "c.csv"
    rng = np.random.default_rng(0)
    rows = [f"topic{k}a topic{k}b,{k}" for k in rng.integers(0, 4, size=80)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    api = ev.evaluate_clustering(FakeEncoder(256), path, n_experiments=3)
    e = api["scores"]["test"][0]
    assert e["v_measure"] == pytest.approx(1.0) and e["v_measure_std"] == pytest.approx(0.0)
    assert api["llm2vec_fast"]["n_labels"] == 4 and api["llm2vec_fast"]["cluster_size"] == 16_384
    mteb = pytest.importorskip("mteb")
    assert mteb.TaskResult.from_dict(api).task_name.endswith("-clustering")
    args = _parser().parse_args(["eval", "clustering", "--data", str(path), "--n-experiments", "3"])
    assert args.func(args, model=FakeEncoder(256)) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    name = f"{tmp_path.name}-clustering"  # the data's folder, as for classification
    assert printed[-1] == f"{e['main_score']:.6f}" and f"| {name} | test | v_measure |" in "\n".join(printed)
    path.write_text("text,label\na,1\nb,1\n")
    with pytest.raises(ValueError, match="at least 2 distinct labels, got 1"):
        ev.evaluate_clustering(FakeEncoder(), path)
    with pytest.raises(ValueError, match="n_experiments"):
        ev.clustering_scores(np.zeros((4, 2)), [0, 1, 0, 1], n_experiments=0)
    with pytest.raises(ValueError, match="cluster_size 1 is smaller than the 2 clusters"):
        ev.clustering_scores(np.zeros((4, 2)), [0, 1, 0, 1], cluster_size=1)


# ---------------------------------------------------------------------- reranking
def _rerank_case(seed=0, n_queries=12, dim=8):
    rng = np.random.default_rng(seed)
    n_pos = rng.integers(1, 4, size=n_queries)
    n_neg = rng.integers(1, 15, size=n_queries)
    q = rng.normal(size=(n_queries, dim))
    docs = np.concatenate([np.concatenate([q[i] + rng.normal(scale=1.5, size=(p, dim)), rng.normal(size=(m, dim))])
                           for i, (p, m) in enumerate(zip(n_pos, n_neg, strict=True))])
    return q, docs, n_pos, n_neg


def test_reranking_scores_equal_sentence_transformers():
    """MAP, MRR@k and nDCG@k equal sentence-transformers' RerankingEvaluator on the same embeddings."""
    pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    try:
        from sentence_transformers.sentence_transformer.evaluation import RerankingEvaluator
    except ImportError:
        from sentence_transformers.evaluation import RerankingEvaluator
    q, docs, n_pos, n_neg = _rerank_case()
    names, start, samples = {}, 0, []
    for i, (p, m) in enumerate(zip(n_pos, n_neg, strict=True)):
        ids = [f"d{j}" for j in range(start, start + p + m)]
        names.update({f"q{i}": q[i], **dict(zip(ids, docs[start:start + p + m], strict=True))})
        samples.append({"query": f"q{i}", "positive": ids[:p], "negative": ids[p:]})
        start += p + m

    class Lookup:
        def _enc(self, texts, **kw):
            return torch.tensor(np.stack([names[t] for t in texts]), dtype=torch.float64)

        encode_query = encode_document = encode = _enc

    for k in (10, 3):
        theirs = RerankingEvaluator(samples, at_k=k).compute_metrics(Lookup())
        ours = ev.reranking_scores(q, docs, n_pos, n_neg, at_k=k)
        assert ours["map"] == pytest.approx(theirs["map"], abs=1e-12)
        assert ours[f"mrr_at_{k}"] == pytest.approx(theirs["mrr"], abs=1e-12)
        assert ours[f"ndcg_at_{k}"] == pytest.approx(theirs["ndcg"], abs=1e-12)
        assert ours["main_score"] == ours["map"] and 0.3 < ours["map"] < 1


def test_reranking_scores_hand_computed_and_ties():
    pytest.importorskip("sklearn")
    q = np.array([[1.0, 0.0]])
    # cosines 0.6 (relevant), 1.0, 0.0 (irrelevant): the relevant text ranks 2nd: AP 1/2, RR 1/2
    docs = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    s = ev.reranking_scores(q, docs, [1], [2])
    assert s["map"] == pytest.approx(0.5) and s["mrr_at_10"] == pytest.approx(0.5)
    assert s["ndcg_at_10"] == pytest.approx(1 / math.log2(3))
    assert ev.reranking_scores(q, docs, [1], [2], at_k=1)["mrr_at_1"] == 0.0
    # every candidate scored alike (e.g. zero embeddings): the relevant ones rank last for MRR
    flat = ev.reranking_scores(q, np.zeros((4, 2)), [1], [3])
    assert flat["mrr_at_10"] == pytest.approx(1 / 4) and flat["map"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="query 0 has 1 relevant and 0 irrelevant texts"):
        ev.reranking_scores(q, docs[:1], [1], [0])
    with pytest.raises(ValueError, match=r"expected 3 documents"):
        ev.reranking_scores(q, docs[:2], [1], [2])


def test_load_reranking_layouts(data_dir, tmp_path):
    snli = ev.load_reranking(data_dir / "snli" / "snli_devtest_triplets.csv", split="dev")
    assert len(snli) == 2943 and all(len(s["positive"]) == len(s["negative"]) == 1 for s in snli)
    assert snli[0]["query"].startswith("Two women are embracing")
    # a row per query with lists (MTEB / sentence-transformers samples), JSONL and JSON array alike
    rows = [{"query": "q1", "positive": ["a", "b"], "negative": ["c", "d", "a"]},
            {"query": "q2", "positive": "e", "negative": []},
            {"query": "q1", "positive": "b", "negative": "f"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "r.json").write_text(json.dumps(rows))
    for name in ("r.jsonl", "r.json"):
        got = ev.load_reranking(tmp_path / name)
        # q1's rows merged in order, repeats kept once, "a" (listed both ways) counted as relevant
        assert got == [{"query": "q1", "positive": ["a", "b"], "negative": ["c", "d", "f"]},
                       {"query": "q2", "positive": ["e"], "negative": []}]
    # CSV with numbered negative columns and a JSON list in a cell; TSV read without quoting
    (tmp_path / "r.csv").write_text('anchor,positive,negative_1,negative_2\nq,"[""a"", ""b""]",c,\nq2,x,y,z\n')
    assert ev.load_reranking(tmp_path / "r.csv") == [{"query": "q", "positive": ["a", "b"], "negative": ["c"]},
                                                     {"query": "q2", "positive": ["x"], "negative": ["y", "z"]}]
    (tmp_path / "r.tsv").write_text('query\tpos\tneg\n"q"\t"a\tb\n')
    assert ev.load_reranking(tmp_path / "r.tsv") == [{"query": '"q"', "positive": ['"a'], "negative": ["b"]}]


def test_load_reranking_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reranking data"):
        ev.load_reranking(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "q", "positive": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a row needs a non-empty query .*\['positive', 'text'\]"):
        ev.load_reranking(bad)
    bad.write_text('{"query": "q", "positive": ["a", 3]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected texts \(strings\) under 'positive', got 3"):
        ev.load_reranking(bad)
    (tmp_path / "bad.csv").write_text("query,positive\nq,a,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: the row has more fields than the header"):
        ev.load_reranking(tmp_path / "bad.csv")
    (tmp_path / "s.csv").write_text("split,query,positive,negative\ntest,q,a,b\n")
    with pytest.raises(ValueError, match=r"no rows read \(split='dev'\)"):
        ev.load_reranking(tmp_path / "s.csv", split="dev")
    (tmp_path / "x.txt").write_text("q\n")
    with pytest.raises(ValueError, match="expected a .jsonl, .json, .csv or .tsv"):
        ev.load_reranking(tmp_path / "x.txt")
    only_pos = tmp_path / "p.jsonl"
    only_pos.write_text('{"query": "q", "positive": "a"}\n')
    with pytest.raises(ValueError, match="no query has both a relevant and an irrelevant text"):
        ev.evaluate_reranking(FakeEncoder(), only_pos)


def test_evaluate_reranking_encodes_once_and_cli_matches_api(data_dir, tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "r.jsonl"
    rows = [{"query": "red apple pie", "positive": ["apple pie red", "shared"], "negative": ["blue car", "shared x"]},
            {"query": "fast blue car", "positive": ["blue car fast"], "negative": ["apple pie red", "shared"]},
            {"query": "no negatives", "positive": ["x"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    enc = FakeEncoder()
    api = ev.evaluate_reranking(enc, path, instruction="Find it")
    queries, docs = enc.calls
    assert queries == [["Find it", "red apple pie"], ["Find it", "fast blue car"]]  # instruction on queries only
    assert sorted(docs) == sorted({"apple pie red", "shared", "blue car", "shared x", "blue car fast"})
    e, info = api["scores"]["test"][0], api["llm2vec_fast"]
    assert e["map"] == e["main_score"] == pytest.approx(1.0) and e["mrr_at_10"] == pytest.approx(1.0)
    assert info["n_queries"] == 2 and info["left_out_queries"] == 1 and info["n_documents"] == 5
    assert info["positives_per_query"] == [1, 1.5, 2] and info["negatives_per_query"] == [2, 2.0, 2]
    # the SNLI triplet file, dev rows: the CLI prints the API's main score last and writes MTEB's layout
    out = tmp_path / "snli_rr.json"
    data = data_dir / "snli" / "snli_devtest_triplets.csv"
    args = _parser().parse_args(["eval", "reranking", "--data", str(data), "--split", "dev", "--limit", "200",
                                 "--output", str(out)])
    assert args.func(args, model=FakeEncoder()) == 0
    printed = capsys.readouterr().out.strip().split("\n")
    api = ev.evaluate_reranking(FakeEncoder(), data, split="dev", limit=200)
    saved = json.loads(out.read_text())
    e = api["scores"]["validation"][0]
    assert saved["scores"] == api["scores"] and saved["task_name"] == "snli_devtest_triplets-reranking"
    assert printed[-1] == f"{e['main_score']:.6f}" and "| validation | map |" in "\n".join(printed)
    # word overlap ranks the entailed hypothesis above the contradiction more often than chance (MAP 0.75)
    assert api["llm2vec_fast"]["n_queries"] == 200 and 0.78 < e["map"] <= 1
    mteb = pytest.importorskip("mteb")
    assert mteb.TaskResult.from_dict(saved).task_name == "snli_devtest_triplets-reranking"


def test_reranking_metrics_equal_sklearn_with_ties():
    """The vectorised AP and nDCG equal scikit-learn's (ties entering together / sharing their average gain) on
    lists with many ties and odd lengths."""
    pytest.importorskip("sklearn")
    from sklearn.metrics import average_precision_score, ndcg_score

    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        rel = rng.integers(0, 2, size=n)
        rel[0], rel[-1] = 1, 0
        s = rng.integers(0, 4, size=n).astype(np.float64)  # few distinct values: ties everywhere
        assert ev._average_precision(rel, s) == pytest.approx(average_precision_score(rel, s), abs=1e-12)
        for k in (1, 3, 10, 40):
            assert ev._ndcg_at(rel, s, k) == pytest.approx(ndcg_score([rel], [s], k=k), abs=1e-12)


def test_reranking_reader_is_strict_about_splits_and_columns(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "positive": "p", "negative": "n", "split": "dev"}\n'
                    '{"query": "q2", "positive": "p", "negative": "n"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: split='dev' given, but the row has no split column"):
        ev.load_reranking(path, split="dev")
    path.write_text('{"query": "q", "positive": "p", "negative": "n", "split": "dev"}\n')
    with pytest.raises(ValueError, match=r"no rows read \(split='validation'\); split values in the file: \['dev'\]"):
        ev.load_reranking(path, split="validation")
    # texts under several accepted names are all taken; an unknown column is named when nothing can be ranked
    path.write_text('{"query": "q", "positive": "a", "pos": ["b"], "negs": ["n"]}\n')
    assert ev.load_reranking(path)[0]["positive"] == ["a", "b"]
    with pytest.raises(ValueError, match=r"nothing to rank \(unrecognised columns \['negs'\]; .*irrelevant under "
                                         r"negative/negatives"):
        ev.evaluate_reranking(FakeEncoder(), path)
    # a pretty-printed JSON object, and sentence-transformers' {id: sample} dict
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"query": "q", "positive": ["p"], "negative": ["n"]}, indent=2))
    assert ev.load_reranking(one) == [{"query": "q", "positive": ["p"], "negative": ["n"]}]
    one.write_text(json.dumps({"a": {"query": "q", "positive": "p", "negative": "n"},
                               "b": {"query": "r", "positive": "p", "negative": "n"}}, indent=2))
    assert [s["query"] for s in ev.load_reranking(one)] == ["q", "r"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q",\n "positive": "p"}\n')
    with pytest.raises(ValueError, match="expected a JSON array, one JSON object, or one object per line"):
        ev.load_reranking(bad)


def test_reranking_records_what_reading_merged_and_dropped(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "positive": ["a", "a", "b"], "negative": ["c", "d", "d", "a"]}\n'
                    '{"query": "q", "positive": "b", "negative": "e"}\n')
    info = ev.evaluate_reranking(FakeEncoder(), path)["llm2vec_fast"]
    assert info["rows_merged"] == 1 and info["repeated_texts_dropped"] == 3 and info["relevant_and_irrelevant"] == 1
    assert info["unrecognised_columns"] == []


def test_reranking_scores_validate_their_inputs():
    q, d = np.ones((1, 3)), np.eye(3)
    for counts, message in ((([-1], [3]), r"n_pos must hold ints >= 0 \(texts per query\), got -1"),
                            (([1.5], [1]), "n_pos must hold ints >= 0"), (([1], [True]), "n_neg must hold ints")):
        with pytest.raises(ValueError, match=message):
            ev.reranking_scores(q, d[:2], *counts)
    with pytest.raises(ValueError, match=r"must be \[N, D\] with one D, got \(1, 3\) and \(2, 4\)"):
        ev.reranking_scores(q, np.ones((2, 4)), [1], [1])
    nan = np.array([[np.nan, 0, 0]])
    with pytest.raises(ValueError, match="query embedding 0 is not finite"):
        ev.reranking_scores(nan, d[:2], [1], [1])
    with pytest.raises(ValueError, match="at_k must be a positive int, got 0"):
        ev.reranking_scores(q, d[:2], [1], [1], at_k=0)


def test_cli_checks_counts_before_loading_the_model(tmp_path):
    args = _parser().parse_args(["eval", "reranking", "--data", str(tmp_path / "x.jsonl"), "--at-k", "0"])
    with pytest.raises(ValueError, match="at_k must be a positive int, got 0"):
        args.func(args)  # no model given: the check comes first, or the default model would load
