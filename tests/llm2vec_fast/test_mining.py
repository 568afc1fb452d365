"""semantic_search against brute force (and sentence-transformers'), hard-negative mining's rules on hand-placed
embeddings, and ``llm2vec-fast mine`` end to end."""
import json
import math

import numpy as np
import pytest
import torch

from llm2vec_fast.cli import CLIError, build_parser, main
from llm2vec_fast.mining import incomplete_path, mine_hard_negatives, run_mine
from llm2vec_fast.similarity import semantic_search
from llm2vec_fast.training.data import read_triplets


# ---------------------------------------------------------------------- semantic_search
def _brute(q, c, k, exclude=None):
    s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    if exclude:
        for r, ids in enumerate(exclude):
            s[r, list(ids)] = -math.inf
    return s.topk(k, dim=1)


@pytest.mark.parametrize("q_chunk,c_chunk", [(100, 500_000), (3, 4), (1, 1)])
def test_semantic_search_matches_brute_force(q_chunk, c_chunk):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 5, generator=g), torch.randn(23, 5, generator=g)
    hits = semantic_search(q, c, top_k=6, query_chunk_size=q_chunk, corpus_chunk_size=c_chunk)
    scores, ids = _brute(q, c, 6)
    assert len(hits) == 7
    for row, s, i in zip(hits, scores, ids, strict=True):
        assert [h["corpus_id"] for h in row] == i.tolist()
        np.testing.assert_allclose([h["score"] for h in row], s.numpy(), rtol=1e-5, atol=1e-6)


def test_semantic_search_exclude_short_corpus_and_other_functions():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    exclude = [[0, 1], [], [5], [0, 1, 2, 3, 4]]
    hits = semantic_search(q.numpy(), c.numpy(), top_k=10, corpus_chunk_size=4, exclude=exclude)
    # top_k above the corpus: every row not excluded, best first
    assert [len(h) for h in hits] == [4, 6, 5, 1]
    scores, ids = _brute(q, c, 6, exclude)
    for row, _s, i, ex in zip(hits, scores, ids, exclude, strict=True):
        assert [h["corpus_id"] for h in row] == i.tolist()[:6 - len(ex)]
        assert not {h["corpus_id"] for h in row} & set(ex)
    dot = semantic_search(q, c, top_k=2, score_function="dot")
    assert [h["corpus_id"] for h in dot[0]] == (q[0] @ c.T).topk(2).indices.tolist()
    manual = semantic_search(q, c, top_k=2, score_function=lambda a, b: -torch.cdist(a, b))
    assert manual == semantic_search(q, c, top_k=2, score_function="euclidean")


def test_semantic_search_same_as_sentence_transformers():
    util = pytest.importorskip("sentence_transformers.util")
    g = torch.Generator().manual_seed(2)
    q, c = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    ours = semantic_search(q, c, top_k=5, corpus_chunk_size=7)
    theirs = util.semantic_search(q, c, top_k=5, corpus_chunk_size=7)
    assert [[h["corpus_id"] for h in r] for r in ours] == [[h["corpus_id"] for h in r] for r in theirs]
    np.testing.assert_allclose([[h["score"] for h in r] for r in ours], [[h["score"] for h in r] for r in theirs],
                               rtol=1e-5, atol=1e-6)


def test_semantic_search_errors():
    a, b = torch.ones(2, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="different widths: 3 and 2"):
        semantic_search(a, torch.ones(4, 2))
    with pytest.raises(ValueError, match="top_k must be an int >= 1, got 0"):
        semantic_search(a, b, top_k=0)
    with pytest.raises(ValueError, match="unknown similarity function 'cos'"):
        semantic_search(a, b, score_function="cos")
    bad = b.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="corpus_embeddings row 2 is not finite"):
        semantic_search(a, bad)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        semantic_search(a, b, exclude=[[0]])


# ---------------------------------------------------------------------- mining on hand-placed embeddings
ANGLES = {"q1": 0, "q2": 180, "p1": 10, "p1b": 5, "near": 12, "mid1": 30, "mid2": 40, "far": 90, "p2": 170,
          "q3": 270, "p3": 260}


class AngleEncoder:
    """Unit vectors at fixed angles (degrees) per text; records what it was asked to encode."""

    device = torch.device("cpu")

    def tokenize_items(self, pairs):  # marks an LLM2Vec-like encoder: it takes [instruction, text] pairs
        raise NotImplementedError

    def __init__(self):
        self.calls = []

    def encode(self, items, convert_to_tensor=False, normalize_embeddings=False, show_progress_bar=False, **kw):
        self.calls.append(list(items))
        self.kwargs = kw
        texts = [it[1] if isinstance(it, list) else it for it in items]
        if any(not t.strip() for t in texts):
            raise AssertionError(f"asked to encode a blank text: {texts}")
        rad = torch.tensor([math.radians(ANGLES[t]) for t in texts], dtype=torch.float64)
        return torch.stack([rad.cos(), rad.sin()], 1).float()


def cos(a, b):
    return math.cos(math.radians(ANGLES[a] - ANGLES[b]))


ROWS = [{"query": "q1", "positive": "p1"}, {"query": "q1", "positive": "p1b"}, {"query": "q2", "positive": "p2"}]
EXTRA = ["near", "mid1", "mid2", "far", "p1"]


def test_mining_rules_on_hand_placed_embeddings():
    enc = AngleEncoder()
    rows, incomplete, stats = mine_hard_negatives(enc, ROWS, corpus=EXTRA, num_negatives=2,
                                                  instruction="Find it")
    assert incomplete == []
    # q1: its other positive p1b scores highest but is a positive of the same query; "near" is within 5 % of the
    # positive's score (a likely false negative); so mid1, mid2
    assert rows[0]["negative"] == ["mid1", "mid2"] and rows[1]["negative"] == ["mid1", "mid2"]
    assert rows[2]["negative"] == ["far", "mid2"]
    for r in rows:
        assert r["positive_score"] == pytest.approx(cos(r["query"], r["positive"]), abs=1e-5)
        assert r["negative_scores"] == pytest.approx([cos(r["query"], n) for n in r["negative"]], abs=1e-5)
        assert max(r["negative_scores"]) <= 0.95 * r["positive_score"] or r["positive_score"] <= 0
    assert stats["corpus"] == 7 and stats["queries"] == 2 and stats["complete"] == 3
    assert stats["candidates_over_margin"] == 2  # "near" for both q1 rows
    # instructions on queries only, each text encoded once
    queries, docs = enc.calls
    assert queries == [["Find it; ", "q1"], ["Find it; ", "q2"]]
    assert sorted(docs) == sorted(set(docs)) and all(isinstance(d, str) for d in docs)


def test_margins_ranges_and_sampling():
    enc = AngleEncoder()
    # without the relative margin, "near" comes back for q1
    rows, _, _ = mine_hard_negatives(enc, ROWS, corpus=EXTRA, num_negatives=2, relative_margin=None)
    assert rows[0]["negative"] == ["near", "mid1"]
    # an absolute margin of 0.15 below 0.985 leaves mid2 (0.766) first: mid1 scores 0.866
    rows, _, _ = mine_hard_negatives(enc, ROWS, corpus=EXTRA, num_negatives=1, relative_margin=None,
                                     absolute_margin=0.15)
    assert rows[0]["negative"] == ["mid2"]
    rows, _, _ = mine_hard_negatives(enc, ROWS, corpus=EXTRA, num_negatives=2, range_min=1, range_max=3)
    assert rows[2]["negative"] == ["mid2", "mid1"]
    draws = [mine_hard_negatives(enc, ROWS, corpus=EXTRA, num_negatives=2, sampling="random", seed=s)[0]
             for s in (0, 0, 1, 2, 3)]
    assert draws[0] == draws[1]
    eligible = {"far", "mid2", "mid1", "near", "p1", "p1b"}
    for d in draws:
        assert set(d[2]["negative"]) <= eligible and len(d[2]["negative"]) == 2
        assert d[2]["negative_scores"] == sorted(d[2]["negative_scores"], reverse=True)
    assert len({tuple(d[2]["negative"]) for d in draws}) > 1


def test_existing_negatives_kept_first_and_incomplete_rows_set_apart():
    enc = AngleEncoder()
    rows_in = [dict(ROWS[0], negatives=["far"]), ROWS[2]]
    rows, incomplete, stats = mine_hard_negatives(enc, rows_in, corpus=EXTRA, num_negatives=4)
    # q1 (positive p1): p1b excluded, near over the margin, far already its negative: mid1, mid2, p2 only
    assert [r["query"] for r in incomplete] == ["q1"] and incomplete[0]["negative"][0] == "far"
    assert incomplete[0]["negative"][1:] == ["mid1", "mid2", "p2"]
    assert [r["query"] for r in rows] == ["q2"] and len(rows[0]["negative_scores"]) == 4
    assert stats["incomplete"] == 1 and stats["set_apart"] == 1 and stats["written"] == 1
    kept, aside, _ = mine_hard_negatives(enc, rows_in, corpus=EXTRA, num_negatives=4, keep_incomplete=True)
    assert aside == [] and [r["query"] for r in kept] == ["q1", "q2"]
    dropped, _, _ = mine_hard_negatives(enc, rows_in, corpus=EXTRA, num_negatives=2, keep_existing=False)
    assert dropped[0]["negative"] == ["mid1", "mid2"]


@pytest.mark.parametrize("kw,message", [
    (dict(num_negatives=0), "num_negatives must be an int >= 1, got 0"),
    (dict(range_min=-1), "range_min must be an int >= 0, got -1"),
    (dict(range_min=5, range_max=6), "range_max must be an int >= range_min \\+ num_negatives = 8, got 6"),
    (dict(relative_margin=1.0), "relative_margin must be in \\[0, 1\\) or None, got 1.0"),
    (dict(absolute_margin=float("nan")), "absolute_margin must be a finite number >= 0 or None, got nan"),
    (dict(sampling="best"), "sampling must be one of \\('top', 'random'\\), got 'best'"),
])
def test_argument_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        mine_hard_negatives(AngleEncoder(), ROWS, **kw)


class PlainEncoder(AngleEncoder):
    """An encoder without LLM2Vec's [instruction, text] pairs (sentence-transformers' encode: strings, prompt=)."""

    tokenize_items = None

    def encode(self, items, **kw):
        assert all(isinstance(t, str) for t in items), items
        return super().encode(items, **kw)


def test_blank_texts_singular_negative_key_and_plain_encoders():
    enc = AngleEncoder()
    rows_in = [{"query": "q3", "positive": "p3", "negative": "   "}, {"query": "q1", "positive": "p1",
                                                                      "negative": ["far"]}]
    rows, _, stats = mine_hard_negatives(enc, rows_in, corpus=["  ", "mid1", "mid2", ""], num_negatives=1,
                                         relative_margin=None)
    # blank texts are never candidates (they embed to zeros); "negative" (a string or a list) is read
    assert stats["corpus"] == 5 and all(r["negative"][-1].strip() for r in rows)
    assert rows[1]["negative"][0] == "far"
    plain = PlainEncoder()
    rows2, _, _ = mine_hard_negatives(plain, ROWS, corpus=EXTRA, num_negatives=2, instruction="Find it")
    assert plain.calls[0] == ["q1", "q2"] and plain.calls[1] != plain.calls[0]
    assert rows2[0]["negative"] == ["mid1", "mid2"]


def test_example_errors():
    with pytest.raises(ValueError, match="no examples"):
        mine_hard_negatives(AngleEncoder(), [])
    with pytest.raises(TypeError, match="example 1 must be a dict with string 'query' and 'positive'"):
        mine_hard_negatives(AngleEncoder(), [ROWS[0], {"query": "q1"}])
    with pytest.raises(TypeError, match="corpus item 0 must be a string, got int"):
        mine_hard_negatives(AngleEncoder(), ROWS, corpus=[3])
    with pytest.raises(TypeError, match="corpus must be a list of document strings, got one string"):
        mine_hard_negatives(AngleEncoder(), ROWS, corpus="xyz")
    with pytest.raises(ValueError, match="example 0 has a blank query"):
        mine_hard_negatives(AngleEncoder(), [{"query": "  ", "positive": "p1"}])
    with pytest.raises(TypeError, match="example 0: negatives must be a list of strings"):
        mine_hard_negatives(AngleEncoder(), [{"query": "q1", "positive": "p1", "negatives": 5}])


# ---------------------------------------------------------------------- CLI
def _write_csv(path, rows):
    path.write_text("split,sent0,sent1,hard_neg\n" + "".join(f"dev,{q},{p},{n}\n" for q, p, n in rows))
    return path


def _args(*argv):
    return build_parser("mine").parse_args(["mine", *argv])


def test_cli_writes_training_data_and_sets_incomplete_rows_apart(tmp_path, capsys):
    data = _write_csv(tmp_path / "in.csv", [("q1", "p1", "far"), ("q2", "p2", "")])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in EXTRA))
    out = tmp_path / "mined.jsonl"
    args = _args("-i", str(data), "-o", str(out), "--corpus", str(corpus), "--num-negatives", "4", "--no-progress")
    assert run_mine(args, model=AngleEncoder()) == 0
    err = capsys.readouterr().err
    assert "1 written" in err and "1 with fewer than 4 negatives" in err
    back = read_triplets(out)
    assert [(r["query"], r["negatives"]) for r in back] == [("q2", ["far", "mid2", "mid1", "near"])]
    aside = incomplete_path(out)
    assert aside.name == "mined.incomplete.jsonl"
    assert [r["query"] for r in read_triplets(aside)] == ["q1"]
    # a complete rerun removes the earlier run's set-apart file
    assert run_mine(_args("-i", str(data), "-o", str(out), "--corpus", str(corpus), "--num-negatives", "1",
                          "--no-progress"), model=AngleEncoder()) == 0
    assert not aside.exists() and len(read_triplets(out)) == 2


def test_cli_errors(tmp_path, capsys):
    data = _write_csv(tmp_path / "in.csv", [("q1", "p1", "far")])
    with pytest.raises(CLIError, match="--output must be a .jsonl file"):
        run_mine(_args("-i", str(data), "-o", str(tmp_path / "x.csv")), model=AngleEncoder())
    with pytest.raises(CLIError, match="does not exist"):
        run_mine(_args("-i", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "x.jsonl")), model=AngleEncoder())
    with pytest.raises(CLIError, match="--range-max must be an int >= --range-min"):
        run_mine(_args("-i", str(data), "-o", str(tmp_path / "x.jsonl"), "--range-max", "2"), model=AngleEncoder())
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CLIError, match="no query column"):
        run_mine(_args("-i", str(tmp_path / "bad.csv"), "-o", str(tmp_path / "x.jsonl")), model=AngleEncoder())
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_end_to_end_with_a_model(tiny_encoder_dir, tmp_path, capsys):
    data = _write_csv(tmp_path / "in.csv", [("A man plays a flute.", "Someone plays music.", "A cat sleeps."),
                                            ("The market fell.", "Stocks dropped.", "It rained."),
                                            ("A child runs.", "A kid is running.", "A dog barks.")])
    out = tmp_path / "mined.jsonl"
    code = main(["mine", "-i", str(data), "-o", str(out), "--model", str(tiny_encoder_dir), "--device", "cpu",
                 "--num-negatives", "1", "--relative-margin", "-1", "--instruction", "Retrieve a paraphrase",
                 "--no-progress"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert len(r["negative"]) == 2 and r["negative"][1] not in (r["positive"], r["query"])


def test_blank_existing_negatives_are_not_kept():
    from llm2vec_fast.mining import _example

    ex = _example(0, {"query": "q", "positive": "p", "negative": ["   ", "a real one"]})
    assert ex["negatives"] == ["a real one"]
