"""Built-in evaluation on local files (no downloads): STS, BEIR-style retrieval, reranking, classification, pair
classification, clustering.

Every ``evaluate_*`` function takes any encoder with the ``LLM2Vec.encode`` signature (``encode(sentences,
batch_size=..., show_progress_bar=..., convert_to_numpy=..., max_batch_tokens=...)``, items are strings or
``[instruction, text]`` pairs) and returns one result dict in MTEB's per-task layout::

    {"dataset_revision": ..., "task_name": ..., "mteb_version": ..., "evaluation_time": seconds,
     "kg_co2_emissions": None,
     "scores": {"test": [{"main_score": ..., <metrics>, "hf_subset": "default", "languages": ["eng-Latn"]}]},
     "llm2vec_fast": {<what was run: data file, sizes, instruction, model settings>}}

so ``mteb.results.TaskResult.from_dict`` reads it. Scores are fractions (0.8123), as MTEB stores them; the summary
table shows them ×100. The CLI (``llm2vec-fast eval <task>``, one subcommand per task above) calls the same
functions, so the numbers match the Python API exactly.

Formats:

- STS-B (``sts-dev.csv``): tab-separated, no quoting, columns genre, file, year, id, score, s1, s2 (a few rows carry
  extra columns after s2: ignored). SICK (``SICK_trial.txt`` etc.): a header ``pair_ID sentence_A sentence_B
  relatedness_score ...``. Metrics: Spearman and Pearson correlation of the cosine similarity with the gold score.
- Retrieval, BEIR layout: ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``),
  ``qrels/<split>.tsv`` (header, then query-id, corpus-id, score). Documents are ``title + " " + text``; the query
  instruction goes to queries only. Metrics: nDCG@10 (linear gain = the graded score, as trec_eval), MRR@10 and
  Recall@100 (relevant = score ≥ ``relevance_threshold``). Queries without any relevant document are skipped.
- Reranking (sentence-transformers' ``RerankingEvaluator``, MTEB 1.x's Reranking): a query with relevant and
  irrelevant candidate texts, one row per query (lists) or per triplet (``query``/``anchor``/``sent0``,
  ``positive``/``sent1``, ``negative``/``hard_neg``; rows of one query merged). Each query's candidates are ranked
  by cosine similarity; metrics: MAP over the whole list (main score), MRR@10 and nDCG@10.
- Classification: CSV with a header, a text column (``text`` or ``sentence``) and a label column (``label`` or
  ``category``); logistic regression (scikit-learn) on standardized embeddings; accuracy and macro-F1.
- Pair classification (MTEB's PairClassification): a SentEval folder (``s1.<split>``, ``s2.<split>``,
  ``labels.<split>``, as SNLI's) or JSONL / CSV / TSV with two text columns and a ``label``; positive labels are
  ``1``, ``true``, ``entailment``, ``duplicate``, ``paraphrase``; negative ``0``, ``false``, ``contradiction``,
  ``not_duplicate``, ``not_paraphrase``; ``neutral`` pairs are left out (MTEB's NLI pair tasks keep entailment
  against contradiction). Metrics as MTEB's: for cosine, dot product, Euclidean and Manhattan distance, average
  precision and the best accuracy and F1 over thresholds (a threshold never splits tied scores); main score
  ``max_ap``.
- Clustering: the classification CSV layout (text and label columns); MTEB's bootstrapped clustering: in each of
  ``n_experiments`` rounds, ``cluster_size`` texts (MTEB's 16,384, whatever the data's size) drawn with replacement
  are clustered by mini-batch k-means (k = the number of labels, k-means++, batch 512) and scored by V-measure and
  adjusted mutual information against their labels; main score: the mean V-measure.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from ._io import check_count, check_output_file, iter_jsonl, require_input

logger = logging.getLogger(__name__)

LANGUAGES = ["eng-Latn"]
DEFAULT_RETRIEVAL_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
TASKS = ("sts", "retrieval", "reranking", "classification", "pair-classification", "clustering")


# ---------------------------------------------------------------------- encoding helper
def _items(texts, instruction):
    """Strings, or ``[instruction, text]`` pairs when an instruction is given."""
    if instruction:
        return [[instruction, t] for t in texts]
    return list(texts)


def _embed(model, texts, instruction=None, batch_size=None, max_batch_tokens=None, show_progress_bar=False,
           truncate_dim=None):
    """Encode ``texts`` (optionally instructed) into a float32 numpy array ``[N, D]``; with ``truncate_dim`` its
    first ``truncate_dim`` columns (a Matryoshka embedding's prefix; scores renormalize it)."""
    check_count("truncate_dim", truncate_dim, optional=True)
    width = _width(model)
    if truncate_dim is not None and width is not None and truncate_dim > width:
        raise ValueError(f"truncate_dim {truncate_dim} is more than the embedding width {width}")
    if not texts:
        raise ValueError("nothing to encode: the data file gave no texts")
    kwargs = dict(show_progress_bar=show_progress_bar, convert_to_numpy=True)
    if batch_size is not None:  # else the encoder's own default (ours: the device's token budget)
        kwargs["batch_size"] = batch_size
    if max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = max_batch_tokens
    emb = model.encode(_items(texts, instruction), **kwargs)
    emb = np.asarray(emb.detach().cpu() if hasattr(emb, "detach") else emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(texts)} texts; expected [{len(texts)}, D]")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise ValueError(f"the encoder returned NaN or infinite embeddings for {bad.size} of {len(texts)} texts, "
                         f"first row {bad[0]}: {str(texts[bad[0]])[:80]!r}")
    if truncate_dim is not None:
        if truncate_dim > emb.shape[1]:
            raise ValueError(f"truncate_dim {truncate_dim} is more than the embedding width {emb.shape[1]}")
        emb = np.ascontiguousarray(emb[:, :truncate_dim])
    return emb


def _width(model) -> int | None:
    """The embedding width an encoder announces (LLM2Vec: its config; sentence-transformers: its method), or None."""
    get = getattr(model, "get_sentence_embedding_dimension", None)
    width = get() if callable(get) else getattr(getattr(model, "config", None), "hidden_size", None)
    return width if isinstance(width, int) else None


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    # zero vectors (empty texts) stay zero: cosine 0 with everything rather than NaN
    return x / np.where(n == 0, 1, n)


def _model_info(model) -> dict:
    info = {}
    for key in ("pooling_mode", "max_length", "doc_max_length", "skip_instruction"):
        if hasattr(model, key):
            info[key] = getattr(model, key)
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_name_or_path", None):
        info["model"] = str(cfg._name_or_path)
    return info


def _mteb_version():
    try:
        import importlib.metadata as md

        return md.version("mteb")
    except Exception:  # mteb is optional: the layout does not depend on it
        return None


def task_result(task_name, scores: dict, evaluation_time: float, split: str = "test", extra: dict | None = None,
                dataset_revision: str = "local") -> dict:
    """Wrap one split's scores in MTEB's per-task result layout (see the module docstring)."""
    entry = dict(scores)
    entry.setdefault("hf_subset", "default")
    entry.setdefault("languages", list(LANGUAGES))
    return {
        "dataset_revision": dataset_revision,
        "task_name": task_name,
        "mteb_version": _mteb_version(),
        "scores": {split: [entry]},
        "evaluation_time": evaluation_time,
        "kg_co2_emissions": None,
        "llm2vec_fast": dict(extra or {}),
    }


# ---------------------------------------------------------------------- STS
def load_sts(path) -> tuple[list[str], list[str], np.ndarray]:
    """Read an STS-B TSV or a SICK file: (sentences 1, sentences 2, gold scores)."""
    path = Path(path)
    require_input(path, "STS data file", "an STS-B TSV (sts-dev.csv) or a SICK file")
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    s1, s2, gold = [], [], []
    header = lines[0].split("\t") if lines else []
    if header and header[0].strip() == "pair_ID":  # SICK
        try:
            ia, ib, isc = (header.index(c) for c in ("sentence_A", "sentence_B", "relatedness_score"))
        except ValueError as e:
            raise ValueError(f"{path}: SICK header must name sentence_A, sentence_B and relatedness_score; got "
                             f"{header}") from e
        rows, first = lines[1:], 2
    else:  # STS-B: genre, file, year, id, score, s1, s2 [, extra columns]
        ia, ib, isc = 5, 6, 4
        rows, first = lines, 1
    for n, line in enumerate(rows, start=first):
        if not line.strip():
            continue
        cols = line.rstrip("\r").split("\t")
        if len(cols) <= max(ia, ib, isc):
            raise ValueError(f"{path}:{n}: expected at least {max(ia, ib, isc) + 1} tab-separated columns, got "
                             f"{len(cols)}")
        try:
            score = float(cols[isc])
        except ValueError as e:
            raise ValueError(f"{path}:{n}: score column {isc + 1} is not a number: {cols[isc]!r}"
                             + (" (STS-B files have no header line)" if n == 1 and first == 1 else "")) from e
        s1.append(cols[ia])
        s2.append(cols[ib])
        gold.append(score)
    if not gold:
        raise ValueError(f"{path}: no sentence pairs found")
    return s1, s2, np.asarray(gold, dtype=np.float64)


def sts_scores(emb1: np.ndarray, emb2: np.ndarray, gold) -> dict:
    """Pearson and Spearman correlation of row-wise cosine similarity with ``gold`` (MTEB's STS keys)."""
    from scipy.stats import pearsonr, spearmanr

    cos = np.sum(_unit(emb1) * _unit(emb2), axis=1).astype(np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if len(gold) < 2:
        raise ValueError(f"correlation needs at least 2 pairs, got {len(gold)}")
    pearson = float(pearsonr(cos, gold)[0])
    spearman = float(spearmanr(cos, gold)[0])
    return {"pearson": pearson, "spearman": spearman, "cosine_pearson": pearson, "cosine_spearman": spearman,
            "main_score": spearman}


def evaluate_sts(model, data, *, instruction=None, limit=None, batch_size=None, max_batch_tokens=None,
                 task_name=None, split=None, show_progress_bar=False, truncate_dim=None) -> dict:
    """STS on a local STS-B TSV or SICK file; main score: Spearman of cosine similarity.

    Each distinct sentence is encoded once. ``limit`` keeps the first N pairs. ``instruction`` (optional) is
    applied to both sides, as LLM2Vec does for symmetric tasks. ``split`` names the split in the result (MTEB's
    names); default: from the file name (``*dev*`` / ``*valid*`` / ``*trial*`` → ``validation``, ``*train*`` →
    ``train``, else ``test``).
    """
    t0 = time.perf_counter()
    check_count("limit", limit, optional=True)
    split = mteb_split(split) if split else sts_split(data)
    s1, s2, gold = load_sts(data)
    if limit is not None:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    unique = list(dict.fromkeys(s1 + s2))
    index = {s: i for i, s in enumerate(unique)}
    emb = _embed(model, unique, instruction, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    scores = sts_scores(emb[[index[s] for s in s1]], emb[[index[s] for s in s2]], gold)
    name = task_name or ("SICK-R" if Path(data).name.startswith("SICK") else "STSBenchmark")
    extra = {"task": "sts", "data": str(data), "n_pairs": len(gold), "n_sentences": len(unique),
             "instruction": instruction, "truncate_dim": truncate_dim, **_model_info(model)}
    return task_result(name, scores, time.perf_counter() - t0, split, extra)


def mteb_split(split: str) -> str:
    """A split name as MTEB records it: ``dev`` and ``valid`` are ``validation``."""
    return {"dev": "validation", "valid": "validation"}.get(split, split)


def sts_split(path) -> str:
    """The split an STS file holds, from its name, in MTEB's names."""
    name = Path(path).name.lower()
    if any(k in name for k in ("dev", "valid", "trial")):
        return "validation"
    return "train" if "train" in name else "test"


# ---------------------------------------------------------------------- retrieval
def _read_jsonl(path) -> list[dict]:
    path = Path(path)
    require_input(path, "file", "a JSON lines file")
    rows = []
    # split on "\n" only: str.splitlines would also break on U+2028 inside MS MARCO passages
    for n, row in iter_jsonl(path.read_text(encoding="utf-8-sig").split("\n"), path):
        if "_id" not in row:
            raise ValueError(f"{path}:{n}: expected an object with an '_id' field")
        rows.append(row)
    return rows


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_beir(folder, split="test"):
    """Read a BEIR folder: (corpus {id: "title text"}, queries {id: text}, qrels {qid: {doc_id: score}})."""
    folder = Path(folder)
    require_input(folder, "retrieval data folder", "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)",
                  folder=True)
    corpus = {}
    for row in _read_jsonl(folder / "corpus.jsonl"):
        title, text = (row.get("title") or "").strip(), row.get("text") or ""
        corpus[str(row["_id"])] = f"{title} {text}" if title else text
    queries = {str(r["_id"]): r.get("text") or "" for r in _read_jsonl(folder / "queries.jsonl")}
    qrels_path = folder / "qrels" / f"{split}.tsv"
    require_input(qrels_path, "qrels file", "a TSV of query-id, corpus-id, score")
    qrels: dict[str, dict[str, int]] = {}
    lines = qrels_path.read_text(encoding="utf-8-sig").split("\n")
    for n, line in enumerate(lines, start=1):
        cols = line.rstrip("\r").split("\t")
        if not line.strip() or (n == 1 and not _is_number(cols[-1])):
            continue  # blank line or the header (a first line whose score is no number)
        if len(cols) < 3:
            raise ValueError(f"{qrels_path}:{n}: expected query-id, corpus-id, score; got {line!r}")
        try:
            qrels.setdefault(cols[0], {})[cols[1]] = int(float(cols[2]))
        except ValueError as e:
            raise ValueError(f"{qrels_path}:{n}: score is not a number: {cols[2]!r}") from e
    return corpus, queries, qrels


def subsample_beir(corpus, queries, qrels, max_docs=None, max_queries=None, relevance_threshold=1):
    """A deterministic small slice for quick runs: the first ``max_queries`` queries (file order) that have a relevant
    document, all their relevant documents (kept even past ``max_docs``), then other documents in file order up to
    ``max_docs``. Judged non-relevant documents get no special place: they come in with the fill or not at all. The
    kept queries' qrels are returned whole: a relevant document missing from the corpus still counts in the ideal
    ranking and in recall, as trec_eval (and so mteb) count it."""
    check_count("max_docs", max_docs, optional=True)
    check_count("max_queries", max_queries, optional=True)
    qids = [q for q in queries if any(s >= relevance_threshold for s in qrels.get(q, {}).values())]
    if max_queries is not None:
        qids = qids[:max_queries]
    keep = dict.fromkeys(d for q in qids for d, s in qrels[q].items() if s >= relevance_threshold and d in corpus)
    for d in corpus:
        if max_docs is not None and len(keep) >= max_docs:
            break
        keep.setdefault(d, None)
    # file order, so that the subset's ranking ties break the same way as in the full corpus
    return ({d: t for d, t in corpus.items() if d in keep}, {q: queries[q] for q in qids},
            {q: dict(qrels[q]) for q in qids})


def ndcg_at_k(ranked: list, rels: dict, k: int = 10) -> float:
    """nDCG@k with linear gain (the graded score, as trec_eval): DCG = Σ rel_i / log2(i + 1), i = 1-based rank."""
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((max(r, 0) for r in rels.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: list, rels: dict, k: int = 10, relevance_threshold: int = 1) -> float:
    """Reciprocal rank of the first relevant document within the top ``k`` (0 if none)."""
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) >= relevance_threshold:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: list, rels: dict, k: int = 100, relevance_threshold: int = 1) -> float:
    """Fraction of the relevant documents found in the top ``k`` (0 if the query has none)."""
    relevant = {d for d, r in rels.items() if r >= relevance_threshold}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def retrieval_scores(rankings: dict, qrels: dict, relevance_threshold: int = 1) -> dict:
    """Mean nDCG@10, MRR@10 and Recall@100 over the queries of ``rankings`` ({qid: [doc ids, best first]})."""
    qids = [q for q in rankings if any(s >= relevance_threshold for s in qrels.get(q, {}).values())]
    if not qids:
        raise ValueError("no query has a relevant document in the qrels: nothing to score")
    per = {
        "ndcg_at_10": [ndcg_at_k(rankings[q], qrels[q], 10) for q in qids],
        "mrr_at_10": [mrr_at_k(rankings[q], qrels[q], 10, relevance_threshold) for q in qids],
        "recall_at_100": [recall_at_k(rankings[q], qrels[q], 100, relevance_threshold) for q in qids],
    }
    out = {k: float(np.mean(v)) for k, v in per.items()}
    out["main_score"] = out["ndcg_at_10"]
    return out


def rank(query_emb: np.ndarray, doc_emb: np.ndarray, doc_ids: list, top_k: int = 100) -> list[list]:
    """Doc ids by cosine similarity, best first, top ``top_k`` per query (ties keep corpus order)."""
    sims = _unit(query_emb) @ _unit(doc_emb).T
    k = min(top_k, len(doc_ids))
    out = []
    for row in sims:
        top = np.argsort(-row, kind="stable")[:k]
        out.append([doc_ids[j] for j in top])
    return out


def evaluate_retrieval(model, data, *, instruction=DEFAULT_RETRIEVAL_INSTRUCTION, split="test", max_docs=None,
                       max_queries=None, relevance_threshold=1, batch_size=None, max_batch_tokens=None,
                       task_name=None, show_progress_bar=False, truncate_dim=None) -> dict:
    """Dense retrieval on a local BEIR folder; main score nDCG@10.

    ``instruction`` goes to queries only (``""`` or None: none); documents are ``title + " " + text``, encoded
    without one. ``max_docs`` / ``max_queries`` take a deterministic subset (see :func:`subsample_beir`).
    """
    t0 = time.perf_counter()
    corpus, queries, qrels = load_beir(data, split)
    unknown_docs = sorted({d for q in qrels for d in qrels[q] if d not in corpus})
    unknown_queries = sorted(q for q in qrels if q not in queries)
    for what, ids in (("documents", unknown_docs), ("queries", unknown_queries)):
        if ids:
            logger.warning("%s: the qrels name %d %s missing from the %s (e.g. %s)%s", data, len(ids), what,
                           "corpus" if what == "documents" else "queries file", ", ".join(map(repr, ids[:3])),
                           ": scored as never retrieved, as trec_eval does" if what == "documents" else
                           ": not scored")
    best = max((s for q, rels in qrels.items() if q in queries for s in rels.values()), default=None)
    corpus, queries, qrels = subsample_beir(corpus, queries, qrels, max_docs, max_queries, relevance_threshold)
    if not queries:
        raise ValueError(f"no query has a document scored >= --relevance-threshold {relevance_threshold} in the "
                         f"qrels (highest score there: {best}): nothing to score")
    doc_ids, qids = list(corpus), list(queries)
    doc_emb = _embed(model, [corpus[d] for d in doc_ids], None, batch_size, max_batch_tokens, show_progress_bar,
                     truncate_dim)
    q_emb = _embed(model, [queries[q] for q in qids], instruction, batch_size, max_batch_tokens, show_progress_bar,
                   truncate_dim)
    rankings = dict(zip(qids, rank(q_emb, doc_emb, doc_ids, 100), strict=True))
    scores = retrieval_scores(rankings, qrels, relevance_threshold)
    name = task_name or f"{Path(data).resolve().name}-local"
    extra = {"task": "retrieval", "data": str(data), "n_docs": len(doc_ids), "n_queries": len(qids),
             "qrels_docs_missing_from_corpus": len(unknown_docs), "relevance_threshold": relevance_threshold,
             "instruction": instruction or None,
             "truncate_dim": truncate_dim, **_model_info(model)}
    return task_result(name, scores, time.perf_counter() - t0, split, extra)


# ---------------------------------------------------------------------- classification
def load_classification(path) -> tuple[list[str], list[str]]:
    """Read a CSV with a header naming a text column (``text``/``sentence``) and a label column
    (``label``/``category``): (texts, labels)."""
    path = Path(path)
    require_input(path, "classification data file", "a CSV file with text and label columns")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header such as 'text,label'")
        names = [h.strip().lower() for h in header]
        ti = next((names.index(c) for c in ("text", "sentence") if c in names), None)
        li = next((names.index(c) for c in ("label", "category", "labels") if c in names), None)
        if ti is None or li is None:
            raise ValueError(f"{path}: header {header} must name a text column (text/sentence) and a label column "
                             "(label/category)")
        texts, labels = [], []
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(ti, li):
                raise ValueError(f"{path}:{n}: expected {len(header)} columns, got {len(row)}")
            if not row[li].strip():
                raise ValueError(f"{path}:{n}: the label column ({header[li]!r}) is empty")
            texts.append(row[ti])
            labels.append(row[li])
    empty = sum(not t.strip() for t in texts)
    if empty:
        logger.warning("%s: %d of %d texts are empty (they embed to zero vectors)", path, empty, len(texts))
    if not texts:
        raise ValueError(f"{path}: no rows after the header")
    return texts, labels


def split_rows(texts, labels, test_fraction=0.2, seed=0, n_train=None, n_test=None):
    """Shuffle with a fixed seed and cut into (train texts, train labels, test texts, test labels).

    ``n_train`` / ``n_test`` pick exact sizes (e.g. 400 + 200 rows of Banking77 train); otherwise the last
    ``test_fraction`` of the shuffled rows is the test part.
    """
    n = len(texts)
    order = np.random.default_rng(seed).permutation(n)
    if n_train is None and n_test is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test = max(1, int(round(n * test_fraction)))
        n_train = n - n_test
    n_train = n - (n_test or 0) if n_train is None else n_train
    n_test = n - n_train if n_test is None else n_test
    if n_train < 1 or n_test < 1 or n_train + n_test > n:
        raise ValueError(f"cannot take {n_train} train + {n_test} test rows from {n}")
    tr, te = order[:n_train], order[n_train:n_train + n_test]
    return ([texts[i] for i in tr], [labels[i] for i in tr], [texts[i] for i in te], [labels[i] for i in te])


def _take(texts, labels, n, seed):
    """All rows, or ``n`` of them after a seeded shuffle."""
    if n is None or n >= len(texts):
        return list(texts), list(labels)
    if n < 1:
        raise ValueError(f"row count must be at least 1, got {n}")
    idx = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [texts[i] for i in idx], [labels[i] for i in idx]


def classification_scores(train_emb, train_labels, test_emb, test_labels, seed=0, max_iter=1000) -> dict:
    """Logistic regression (scikit-learn, on standardized features) fit on train, scored on test."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("classification needs scikit-learn: pip install scikit-learn") from e
    # decoder hidden states carry a few huge-magnitude dimensions; standardizing keeps lbfgs well conditioned
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(np.asarray(train_emb, dtype=np.float64), np.asarray(train_labels))
    pred = clf.predict(np.asarray(test_emb, dtype=np.float64))
    acc = float(accuracy_score(test_labels, pred))
    f1 = float(f1_score(test_labels, pred, average="macro"))
    return {"accuracy": acc, "f1": f1, "main_score": acc}


def evaluate_classification(model, train, test=None, *, instruction=None, test_fraction=0.2, n_train=None,
                            n_test=None, seed=0, batch_size=None, max_batch_tokens=None, task_name=None,
                            show_progress_bar=False, truncate_dim=None) -> dict:
    """Linear-probe classification; main score accuracy (plus macro-F1 as ``f1``, MTEB's key).

    With ``test`` None, ``train`` is split with a fixed ``seed`` (see :func:`split_rows`); with both files given,
    ``n_train`` / ``n_test`` still cap each side (first rows after a seeded shuffle).
    """
    t0 = time.perf_counter()
    texts, labels = load_classification(train)
    if test is None:
        tr_x, tr_y, te_x, te_y = split_rows(texts, labels, test_fraction, seed, n_train, n_test)
    else:
        tx, ty = load_classification(test)
        tr_x, tr_y = _take(texts, labels, n_train, seed)
        te_x, te_y = _take(tx, ty, n_test, seed)
    if len(set(tr_y)) < 2:
        raise ValueError(f"the training part has {len(set(tr_y))} distinct label(s); need at least 2")
    unseen = sorted(set(te_y) - set(tr_y))
    if unseen:
        logger.warning("%d test rows have a label the training part lacks (%s): they count as errors",
                       sum(y in set(unseen) for y in te_y), ", ".join(map(repr, unseen[:5])))
    tr_e = _embed(model, tr_x, instruction, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    te_e = _embed(model, te_x, instruction, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    scores = classification_scores(tr_e, tr_y, te_e, te_y, seed)
    name = task_name or f"{Path(train).resolve().parent.name or Path(train).stem}-local"
    extra = {"task": "classification", "train": str(train), "test": str(test) if test else None,
             "n_train": len(tr_x), "n_test": len(te_x), "n_labels": len(set(tr_y)),
             "n_test_unseen_labels": sum(y in set(unseen) for y in te_y), "seed": seed,
             "instruction": instruction, "truncate_dim": truncate_dim, **_model_info(model)}
    return task_result(name, scores, time.perf_counter() - t0, "test", extra)


# ---------------------------------------------------------------------- pair classification
PAIR_POSITIVE = ("1", "true", "entailment", "duplicate", "paraphrase")
PAIR_NEGATIVE = ("0", "false", "contradiction", "not_duplicate", "not_paraphrase", "not_entailment")
PAIR_LEFT_OUT = ("neutral",)
_PAIR_TEXT1 = ("sentence1", "premise", "text1", "sentence_a", "s1")
_PAIR_TEXT2 = ("sentence2", "hypothesis", "text2", "sentence_b", "s2")


def _pair_label(value, where: str) -> int | None:
    """1, 0, or None for a left-out (neutral) pair; whole-number floats (``1.0``) read as integers."""
    key = str(value).strip().lower()
    try:
        number = float(key)
        if number in (0.0, 1.0):
            key = str(int(number))
    except ValueError:
        pass
    if key in PAIR_POSITIVE:
        return 1
    if key in PAIR_NEGATIVE:
        return 0
    if key in PAIR_LEFT_OUT:
        return None
    raise ValueError(f"{where}: label {value!r} is neither positive ({', '.join(PAIR_POSITIVE)}) nor negative "
                     f"({', '.join(PAIR_NEGATIVE)}) nor left out ({', '.join(PAIR_LEFT_OUT)})")


def load_pairs(path, split: str = "test") -> tuple[list[str], list[str], np.ndarray, int]:
    """Read labelled pairs: ``(texts 1, texts 2, labels 0/1, pairs left out)``. ``path``: a SentEval folder
    (``s1.<split>``, ``s2.<split>``, ``labels.<split>``) or a JSONL / CSV / TSV file (``split`` then only names
    the result's split). File columns: two texts (``sentence1``/``sentence2``, ``premise``/``hypothesis``,
    ``text1``/``text2``, ``sentence_A``/``sentence_B``) and ``label`` or ``labels``, in any letter case. TSV is read
    without quoting (quotes are text)."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"{k}.{split}" for k in ("s1", "s2", "labels")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            have = sorted({f.suffix[1:] for f in path.glob("labels.*")})
            raise FileNotFoundError(f"{path}: no {', '.join(missing)} for split {split!r} (SentEval layout "
                                    f"s1.<split>, s2.<split>, labels.<split>; splits here: {have or 'none'})")
        cols = [f.read_text(encoding="utf-8-sig").rstrip("\n").split("\n") for f in files]
        if len({len(c) for c in cols}) != 1:
            raise ValueError(f"{path}: s1, s2 and labels of split {split!r} have different line counts "
                             f"{[len(c) for c in cols]}")
        rows = [(f"{files[2]}:{n}", a.strip(), b.strip(), y) for n, (a, b, y) in
                enumerate(zip(*cols, strict=True), start=1)]
    elif path.is_file():
        if path.suffix in (".jsonl", ".json"):
            records = list(iter_jsonl(path.read_text(encoding="utf-8-sig").split("\n"), path))
        elif path.suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv"
                          else csv.DictReader(f))
                records = [(reader.line_num, r) for r in reader]
        else:
            raise ValueError(f"{path}: expected a SentEval folder or a .jsonl, .csv or .tsv file")
        rows = []
        for n, r in records:
            where = f"{path}:{n}"
            if None in r:  # csv.DictReader's key for the values past the header's last column
                raise ValueError(f"{where}: the row has more fields than the header ({len(r) - 1 + len(r[None])} "
                                 f"for {len(r) - 1}): an unquoted separator inside a text?")
            if any(v is None for v in r.values()):
                raise ValueError(f"{where}: the row has fewer fields than the header "
                                 f"({sum(v is not None for v in r.values())} for {len(r)})")
            r = {str(k).lower(): v for k, v in r.items()}
            k1 = next((k for k in _PAIR_TEXT1 if k in r), None)
            k2 = next((k for k in _PAIR_TEXT2 if k in r), None)
            kl = next((k for k in ("label", "labels") if k in r), None)
            if k1 is None or k2 is None or kl is None:
                raise ValueError(f"{where}: a row needs two texts ({'/'.join(_PAIR_TEXT1)} and "
                                 f"{'/'.join(_PAIR_TEXT2)}) and a label (label/labels); got {sorted(r)}")
            rows.append((where, r[k1], r[k2], r[kl]))
    else:
        raise FileNotFoundError(f"pair classification data {str(path)!r} not found")
    s1, s2, labels, left_out = [], [], [], 0
    for where, a, b, y in rows:
        if not isinstance(a, str) or not isinstance(b, str) or not a.strip() or not b.strip():
            raise ValueError(f"{where}: both texts must be non-empty strings, got {[a, b]}")
        label = _pair_label(y, where)
        if label is None:
            left_out += 1
            continue
        s1.append(a)
        s2.append(b)
        labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: pair classification needs positive and negative pairs, got "
                         f"{sum(labels)} positive and {len(labels) - sum(labels)} negative")
    return s1, s2, np.asarray(labels, dtype=np.int64), left_out


def threshold_metrics(scores, labels, higher_is_similar: bool = True) -> dict:
    """Average precision and the best accuracy and F1 (with its precision and recall) over thresholds placed between
    distinct consecutive scores, as MTEB's pair classification computes them."""
    from sklearn.metrics import average_precision_score

    s = np.asarray(scores) * (1 if higher_is_similar else -1)
    y = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    n, n_pos = len(y), int(y.sum())
    tp = np.cumsum(y)[:-1]  # positives among the first k = 1 .. n-1 rows (those above the threshold)
    k = np.arange(1, n)
    valid = s[:-1] != s[1:]  # a threshold between rows k-1 and k splits no tie
    acc = (tp + (n - n_pos) - (k - tp)) / n
    best_acc = float(acc[valid].max()) if valid.any() else 0.0
    precision, recall = tp / k, tp / max(n_pos, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    f1 = np.where(valid, f1, 0.0)
    i = int(np.argmax(f1)) if len(f1) else 0
    best = len(f1) > 0 and f1[i] > 0
    return {"accuracy": best_acc, "f1": float(f1[i]) if best else 0.0,
            "precision": float(precision[i]) if best else 0.0, "recall": float(recall[i]) if best else 0.0,
            "ap": float(average_precision_score(y, s))}


def pair_classification_scores(emb1: np.ndarray, emb2: np.ndarray, labels) -> dict:
    """MTEB's PairClassification metrics of paired embeddings: ``<fn>_<metric>`` for fn in similarity (cosine),
    cosine, manhattan, euclidean, dot and metric in accuracy, f1, precision, recall, ap; ``max_<metric>`` over them;
    main score ``max_ap``. The scores are computed as MTEB computes them, in the embeddings' own precision, so that
    the same ties (e.g. a text paired with itself) fall the same way."""
    from sklearn.metrics.pairwise import (
        paired_cosine_distances,
        paired_euclidean_distances,
        paired_manhattan_distances,
    )

    e1, e2 = np.asarray(emb1), np.asarray(emb2)
    cos = 1 - paired_cosine_distances(e1, e2)
    functions = {"similarity": (cos, True), "cosine": (cos, True),
                 "manhattan": (paired_manhattan_distances(e1, e2), False),
                 "euclidean": (paired_euclidean_distances(e1, e2), False),
                 "dot": (np.asarray([np.dot(x, y) for x, y in zip(e1, e2, strict=True)]), True)}
    out = {}
    for name, (values, higher) in functions.items():
        for metric, v in threshold_metrics(values, labels, higher).items():
            out[f"{name}_{metric}"] = v
    for metric in ("accuracy", "f1", "precision", "recall", "ap"):
        out[f"max_{metric}"] = max(out[f"{name}_{metric}"] for name in functions)
    out["main_score"] = out["max_ap"]
    return out


def evaluate_pair_classification(model, data, *, split="test", instruction=None, limit=None, batch_size=None,
                                 max_batch_tokens=None, task_name=None, show_progress_bar=False,
                                 truncate_dim=None) -> dict:
    """Pair classification (MTEB's metrics; main score: the best average precision over the similarity functions).

    ``data``: a SentEval folder with ``split`` (SNLI's ``dev`` / ``test``) or a labelled pair file (``split`` names
    the result's split); ``limit`` keeps the first N pairs (after neutral pairs are left out). Each distinct text is
    encoded once; ``instruction`` (optional) goes on both texts.
    """
    t0 = time.perf_counter()
    check_count("limit", limit, optional=True)
    s1, s2, labels, left_out = load_pairs(data, split)
    if limit is not None:
        s1, s2, labels = s1[:limit], s2[:limit], labels[:limit]
        if len(set(labels.tolist())) < 2:
            raise ValueError(f"the first {limit} pairs of {data} hold one label only; raise the limit")
    unique = list(dict.fromkeys(s1 + s2))
    index = {s: i for i, s in enumerate(unique)}
    emb = _embed(model, unique, instruction, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    scores = pair_classification_scores(emb[[index[s] for s in s1]], emb[[index[s] for s in s2]], labels)
    path = Path(data)
    name = task_name or f"{path.name if path.is_dir() else path.stem}-pairs"
    extra = {"task": "pair-classification", "data": str(data), "split": split,
             "n_pairs": len(labels), "n_positive": int(labels.sum()), "left_out_neutral": left_out,
             "n_sentences": len(unique), "instruction": instruction, "truncate_dim": truncate_dim,
             **_model_info(model)}
    result_split = mteb_split(split)
    return task_result(name, scores, time.perf_counter() - t0, result_split, extra)


# ---------------------------------------------------------------------- clustering
CLUSTER_SIZE = 16_384  # MTEB's max_documents_per_cluster: texts drawn per experiment, with replacement


def clustering_scores(emb: np.ndarray, labels, *, n_experiments: int = 10, cluster_size: int = CLUSTER_SIZE,
                      kmeans_batch_size: int = 512, seed: int = 42, rng=None) -> dict:
    """MTEB's bootstrapped clustering scores: per experiment, ``cluster_size`` rows (MTEB's 16,384, whatever the
    data's size) drawn with replacement by ``rng`` (default ``random.Random(seed)``) are clustered by
    ``MiniBatchKMeans`` (k = the number of distinct labels, k-means++, one init, ``random_state=seed``); V-measure
    and AMI against the labels, mean and standard deviation over experiments, and each experiment's
    (``v_measures``, ``ami_scores``)."""
    import random

    try:
        from sklearn.cluster import MiniBatchKMeans
        from sklearn.metrics.cluster import adjusted_mutual_info_score, v_measure_score
    except ImportError as e:
        raise ImportError("clustering needs scikit-learn: pip install scikit-learn") from e
    check_count("n_experiments", n_experiments)
    check_count("cluster_size", cluster_size)
    emb, labels = np.asarray(emb), np.asarray(labels)
    if len(emb) != len(labels):
        raise ValueError(f"{len(emb)} embeddings for {len(labels)} labels")
    k = np.unique(labels).size
    if k < 2:
        raise ValueError(f"clustering needs at least 2 distinct labels, got {k}")
    if cluster_size < k:
        raise ValueError(f"cluster_size {cluster_size} is smaller than the {k} clusters to find; raise it")
    rng, size = rng or random.Random(seed), cluster_size
    v, ami = [], []
    for _ in range(n_experiments):
        idx = rng.choices(range(len(labels)), k=size)
        kmeans = MiniBatchKMeans(n_clusters=k, batch_size=kmeans_batch_size, init="k-means++", n_init=1,
                                 random_state=seed)
        assigned = kmeans.fit_predict(emb[idx])
        v.append(float(v_measure_score(labels[idx], assigned)))
        ami.append(float(adjusted_mutual_info_score(labels[idx], assigned)))
    return {"v_measure": float(np.mean(v)), "v_measure_std": float(np.std(v)), "ami": float(np.mean(ami)),
            "ami_std": float(np.std(ami)), "v_measures": {"Level 0": v}, "ami_scores": {"Level 0": ami},
            "main_score": float(np.mean(v))}


def evaluate_clustering(model, data, *, instruction=None, limit=None, n_experiments=10, cluster_size=CLUSTER_SIZE,
                        seed=42, batch_size=None, max_batch_tokens=None, task_name=None, show_progress_bar=False,
                        truncate_dim=None) -> dict:
    """Clustering of a labelled CSV (the classification layout); main score: mean V-measure (see
    :func:`clustering_scores`). ``limit``: N texts drawn by ``random.Random(seed).sample``, the generator that then
    draws the experiments (MTEB's ``max_document_to_embed``)."""
    import random

    t0 = time.perf_counter()
    check_count("limit", limit, optional=True)
    texts, labels = load_classification(data)
    rng = random.Random(seed)
    if limit is not None and limit < len(texts):
        keep = rng.sample(range(len(texts)), k=limit)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    emb = _embed(model, texts, instruction, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    scores = clustering_scores(emb, labels, n_experiments=n_experiments, cluster_size=cluster_size, seed=seed,
                               rng=rng)
    name = task_name or f"{Path(data).resolve().parent.name or Path(data).stem}-clustering"
    extra = {"task": "clustering", "data": str(data), "n_texts": len(texts), "n_labels": len(set(labels)),
             "n_experiments": n_experiments, "cluster_size": cluster_size, "seed": seed,
             "instruction": instruction, "truncate_dim": truncate_dim, **_model_info(model)}
    return task_result(name, scores, time.perf_counter() - t0, "test", extra)


# ---------------------------------------------------------------------- reranking
_RERANK_QUERY = ("query", "anchor", "sent0", "question")
_RERANK_POS = ("positive", "positives", "pos", "sent1")
_RERANK_NEG = ("negative", "negatives", "neg", "hard_neg", "hard_negative")
_RERANK_OTHER = ("split", "id", "_id", "qid", "query_id")


def _texts_of(row: dict, keys, where: str) -> list[str]:
    """Every text under any of ``keys`` in a row (a string or a list of strings each), then under numbered columns
    ``<key>_1``, ``<key>_2``, …; empty strings are skipped."""
    values = [row[k] for k in keys if k in row and row[k] is not None]
    numbered = sorted((int(k.rsplit("_", 1)[1]), k) for k in row
                      if "_" in k and k.rsplit("_", 1)[0] in keys and k.rsplit("_", 1)[1].isdigit())
    out = []
    for v in values + [row[k] for _, k in numbered]:
        for x in (v if isinstance(v, list) else [v]):
            if x is None or x == "":
                continue
            if not isinstance(x, str):
                raise ValueError(f"{where}: expected texts (strings) under {keys[0]!r}, got {json.dumps(x)}")
            out.append(x)
    return out


def _is_known_column(key: str) -> bool:
    known = _RERANK_QUERY + _RERANK_POS + _RERANK_NEG + _RERANK_OTHER
    return key in known or ("_" in key and key.rsplit("_", 1)[0] in _RERANK_POS + _RERANK_NEG
                            and key.rsplit("_", 1)[1].isdigit())


def _reranking_records(path: Path) -> list[tuple[int, object]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix in (".jsonl", ".json"):
        whole = None
        if path.suffix == ".json" or text.lstrip().startswith("["):
            try:  # a whole-file JSON value: an array of samples, one sample, or {id: sample} (sentence-transformers')
                whole = json.loads(text)
            except json.JSONDecodeError:
                pass
        if isinstance(whole, list):
            return list(enumerate(whole, start=1))
        if isinstance(whole, dict):
            one = any(k in whole for k in _RERANK_QUERY)
            return [(1, whole)] if one else [(i, v) for i, v in enumerate(whole.values(), start=1)]
        try:
            return list(iter_jsonl(text.split("\n"), path))
        except ValueError as e:
            raise ValueError(f"{e} (expected a JSON array, one JSON object, or one object per line)") from e
    if path.suffix in (".csv", ".tsv"):
        import io

        stream = io.StringIO(text, newline="")
        reader = (csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv"
                  else csv.DictReader(stream))
        records = []
        for r in reader:
            if None in r:
                raise ValueError(f"{path}:{reader.line_num}: the row has more fields than the header "
                                 f"{reader.fieldnames}")
            records.append((reader.line_num, {k: _json_list(v) for k, v in r.items()}))
        return records
    raise ValueError(f"{path}: expected a .jsonl, .json, .csv or .tsv file")


def load_reranking(path, split: str | None = None) -> list[dict]:
    """Read reranking data: a list of ``{"query", "positive": [...], "negative": [...]}``, one per distinct query
    in first-appearance order.

    ``path``: JSONL, JSON (an array, one object, or sentence-transformers' ``{id: sample}``) or CSV / TSV with a
    header. Columns: the query (``query``, ``anchor``, ``sent0``, ``question``), relevant texts
    (``positive``/``positives``/``pos``/``sent1``) and irrelevant ones (``negative``/``negatives``/``neg``/
    ``hard_neg``), each a string, a JSON list, or numbered columns (``negative_1``, ``negative_2``, …); texts under
    several of these names are all taken. Both layouts work: MTEB's and sentence-transformers' reranking samples
    (one row per query with lists) and triplet files such as SNLI's (one row per triplet: rows of the same query are
    merged). Within a query a repeated text counts once, and a text listed both as relevant and irrelevant counts as
    relevant (:func:`evaluate_reranking` records how many rows were merged and texts dropped).
    ``split``: keep the rows whose ``split`` column equals it; then every row must have one."""
    return _read_reranking(path, split)[0]


def _read_reranking(path, split):
    """(samples, counts of what reading merged and dropped): see :func:`load_reranking`."""
    path = Path(path)
    require_input(path, "reranking data", "a JSONL / JSON / CSV / TSV file of queries with positives and negatives")
    records = _reranking_records(path)
    groups: dict[str, dict] = {}
    seen_splits, unknown, rows, repeats = set(), set(), 0, 0
    for n, r in records:
        where = f"{path}:{n}"
        if not isinstance(r, dict):
            raise ValueError(f"{where}: expected an object with a query and its texts, got {json.dumps(r)[:80]}")
        if split is not None:
            if "split" not in r:
                raise ValueError(f"{where}: split={split!r} given, but the row has no split column (columns: "
                                 f"{sorted(r)})")
            seen_splits.add(str(r["split"]))
            if str(r["split"]) != split:
                continue
        unknown.update(k for k in r if not _is_known_column(k))
        query = next((r[k] for k in _RERANK_QUERY if k in r), None)
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{where}: a row needs a non-empty query ({', '.join(_RERANK_QUERY)}); got "
                             f"{json.dumps(query) if query is not None else 'columns ' + str(sorted(r))}")
        rows += 1
        g = groups.setdefault(query, {"query": query, "positive": {}, "negative": {}})
        for key, names in (("positive", _RERANK_POS), ("negative", _RERANK_NEG)):
            for t in _texts_of(r, names, where):
                repeats += t in g[key]
                g[key][t] = None
    if not groups:
        found = f"; split values in the file: {sorted(seen_splits)}" if seen_splits else ""
        raise ValueError(f"{path}: no rows read (split={split!r}){found}")
    out, both = [], 0
    for g in groups.values():
        negative = [t for t in g["negative"] if t not in g["positive"]]
        both += len(g["negative"]) - len(negative)
        out.append({"query": g["query"], "positive": list(g["positive"]), "negative": negative})
    counts = {"rows": rows, "queries": len(out), "rows_merged": rows - len(out), "repeated_texts_dropped": repeats,
              "relevant_and_irrelevant": both, "unrecognised_columns": sorted(unknown)}
    return out, counts


def _json_list(value: str):
    """A CSV cell holding a JSON list of texts (``["a", "b"]``) as a list; any other cell as it is."""
    v = value.strip() if isinstance(value, str) else value
    if isinstance(v, str) and v.startswith("[") and v.endswith("]"):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return parsed
    return value


def _average_precision(rel: np.ndarray, s: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` (binary, ties entering together), without its per-call checks:
    Σ over distinct score thresholds of (recall step) × precision."""
    order = np.argsort(-s, kind="stable")
    s, rel = s[order], rel[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each group of tied scores
    tp = np.cumsum(rel)[last]
    k = np.flatnonzero(last) + 1
    recall_step = np.diff(np.r_[0, tp]) / tp[-1]
    return float(np.sum(recall_step * tp / k))


def _ndcg_at(rel: np.ndarray, s: np.ndarray, k: int) -> float:
    """scikit-learn's ``ndcg_score([rel], [s], k=k)`` (binary gains; tied scores share the average gain of their
    group, as its default ``ignore_ties=False``), without its per-call checks."""
    n = len(s)
    order = np.argsort(-s, kind="stable")
    s_sorted, g_sorted = s[order], rel[order].astype(np.float64)
    discount = 1.0 / np.log2(np.arange(n) + 2.0)
    discount[k:] = 0.0
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    mean_gain = np.add.reduceat(g_sorted, starts) / sizes
    dcg = float(np.sum(mean_gain * np.add.reduceat(discount, starts)))
    ideal = np.sort(rel)[::-1].astype(np.float64)
    idcg = float(np.sum(ideal * discount))
    return dcg / idcg if idcg > 0 else 0.0


def reranking_scores(query_emb: np.ndarray, doc_emb: np.ndarray, n_pos, n_neg, at_k: int = 10) -> dict:
    """Reranking metrics of cosine similarity, averaged over queries, as sentence-transformers'
    ``RerankingEvaluator`` (and MTEB 1.x's reranking) computes them: ``map`` (average precision over each query's
    whole candidate list; tied scores enter together), ``mrr_at_{at_k}`` (first relevant text within the top
    ``at_k``; ties are broken against the relevant texts, so a model that scores everything alike gets no credit)
    and ``ndcg_at_{at_k}`` (tied scores share their average gain). mteb 2.x computes MAP@1000 with trec_eval, which
    breaks ties by document id instead: without ties the numbers agree. ``doc_emb`` holds each query's positives
    then negatives, query after query; ``n_pos`` / ``n_neg`` their counts. Main score: ``map``."""
    check_count("at_k", at_k)
    q, d = np.asarray(query_emb, dtype=np.float64), np.asarray(doc_emb, dtype=np.float64)
    n_pos, n_neg = list(n_pos), list(n_neg)
    for name, counts in (("n_pos", n_pos), ("n_neg", n_neg)):
        bad = [c for c in counts if not isinstance(c, (int, np.integer)) or isinstance(c, bool) or c < 0]
        if bad:
            raise ValueError(f"{name} must hold ints >= 0 (texts per query), got {bad[0]!r}")
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"query and document embeddings must be [N, D] with one D, got {q.shape} and {d.shape}")
    if not (len(q) == len(n_pos) == len(n_neg)) or len(d) != sum(n_pos) + sum(n_neg):
        raise ValueError(f"{len(q)} queries, {len(n_pos)}/{len(n_neg)} counts and {len(d)} documents do not "
                         f"match (expected {sum(n_pos) + sum(n_neg)} documents)")
    for name, e in (("query", q), ("document", d)):
        bad = np.flatnonzero(~np.isfinite(e).all(axis=1))
        if bad.size:
            raise ValueError(f"{name} embedding {bad[0]} is not finite (NaN or infinite)")
    q, d = _unit(q), _unit(d)
    aps, rrs, ndcgs = [], [], []
    start = 0
    for i, (p, m) in enumerate(zip(n_pos, n_neg, strict=True)):
        if p == 0 or m == 0:
            raise ValueError(f"query {i} has {p} relevant and {m} irrelevant texts; expected at least one of each")
        s = d[start:start + p + m] @ q[i]
        start += p + m
        rel = np.r_[np.ones(p, dtype=np.int64), np.zeros(m, dtype=np.int64)]
        order = np.lexsort((rel, -s))  # by score, best first; among equal scores the irrelevant first
        first = np.flatnonzero(rel[order][:at_k])
        rrs.append(1.0 / (first[0] + 1) if first.size else 0.0)
        aps.append(_average_precision(rel, s))
        ndcgs.append(_ndcg_at(rel, s, at_k))
    out = {"map": float(np.mean(aps)), f"mrr_at_{at_k}": float(np.mean(rrs)), f"ndcg_at_{at_k}": float(np.mean(ndcgs))}
    out["main_score"] = out["map"]
    return out


def evaluate_reranking(model, data, *, split=None, instruction=None, limit=None, at_k=10, batch_size=None,
                       max_batch_tokens=None, task_name=None, show_progress_bar=False, truncate_dim=None) -> dict:
    """Reranking (sentence-transformers' ``RerankingEvaluator``, MTEB's Reranking task kind): each query's
    candidates ranked by cosine similarity; main score MAP (see :func:`reranking_scores`).

    ``data``: see :func:`load_reranking` (``split`` filters by a ``split`` column and names the result's split,
    default ``test``). Queries without a relevant or without an irrelevant text are left out (as MTEB and
    sentence-transformers do) and counted; ``limit`` keeps the first N scored queries. ``instruction`` goes to
    queries only; each distinct text is encoded once. The result records what reading the file merged and dropped
    (``rows_merged``, ``repeated_texts_dropped``, ``relevant_and_irrelevant``)."""
    t0 = time.perf_counter()
    check_count("limit", limit, optional=True)
    check_count("at_k", at_k)
    samples, counts = _read_reranking(data, split)
    kept = [s for s in samples if s["positive"] and s["negative"]]
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        cols = counts.get("unrecognised_columns")
        raise ValueError(f"{data}: no query has both a relevant and an irrelevant text: nothing to rank"
                         + (f" (unrecognised columns {cols}; relevant texts go under {'/'.join(_RERANK_POS)}, "
                            f"irrelevant under {'/'.join(_RERANK_NEG)})" if cols else ""))
    docs = [t for s in kept for t in s["positive"] + s["negative"]]
    unique = list(dict.fromkeys(docs))
    index = {t: i for i, t in enumerate(unique)}
    q_emb = _embed(model, [s["query"] for s in kept], instruction, batch_size, max_batch_tokens, show_progress_bar,
                   truncate_dim)
    d_emb = _embed(model, unique, None, batch_size, max_batch_tokens, show_progress_bar, truncate_dim)
    scores = reranking_scores(q_emb, d_emb[[index[t] for t in docs]], [len(s["positive"]) for s in kept],
                              [len(s["negative"]) for s in kept], at_k)
    path = Path(data)
    n_pos = [len(s["positive"]) for s in kept]
    n_neg = [len(s["negative"]) for s in kept]
    extra = {"task": "reranking", "data": str(data), "split": split, "n_queries": len(kept),
             "left_out_queries": sum(1 for s in samples if not (s["positive"] and s["negative"])),
             "n_documents": len(unique), "positives_per_query": [min(n_pos), float(np.mean(n_pos)), max(n_pos)],
             "negatives_per_query": [min(n_neg), float(np.mean(n_neg)), max(n_neg)], "at_k": at_k,
             **{k: counts[k] for k in ("rows_merged", "repeated_texts_dropped", "relevant_and_irrelevant",
                                       "unrecognised_columns") if k in counts},
             "instruction": instruction or None, "truncate_dim": truncate_dim, **_model_info(model)}
    result_split = {"dev": "validation", "valid": "validation", None: "test"}.get(split, split)
    return task_result(task_name or f"{path.stem}-reranking", scores, time.perf_counter() - t0, result_split, extra)


# ---------------------------------------------------------------------- reporting
_MAIN_METRIC = {"sts": "cosine_spearman", "retrieval": "ndcg_at_10", "classification": "accuracy",
                "pair-classification": "max_ap", "clustering": "v_measure", "reranking": "map"}


def main_metric_name(result: dict) -> str:
    """The metric that ``main_score`` equals for this result (from its task kind)."""
    return _MAIN_METRIC.get(result.get("llm2vec_fast", {}).get("task"), "main_score")


def summary_table(results) -> str:
    """Markdown table (scores ×100) of one or more result dicts."""
    if isinstance(results, dict):
        results = [results]
    lines = ["| task | split | main metric | main score | other metrics | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        for split, entries in r["scores"].items():
            for e in entries:
                others = ", ".join(f"{k} {100 * v:.2f}" for k, v in e.items()
                                   if isinstance(v, float) and k != "main_score")
                lines.append(f"| {r['task_name']} | {split} | {main_metric_name(r)} | {100 * e['main_score']:.2f} | "
                             f"{others} | {r.get('evaluation_time') or 0:.1f} |")
    return "\n".join(lines) + "\n"


def save_result(result: dict, path) -> Path:
    """Write ``result`` as JSON at ``path`` and the summary table beside it (same name, ``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)  # no half-written result file if interrupted
    finally:
        tmp.unlink(missing_ok=True)
    path.with_suffix(".md").write_text(f"# {result['task_name']}\n\n" + summary_table(result))
    return path


# ---------------------------------------------------------------------- CLI
def _common_options(p):
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--peft", default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--pooling", default=None, choices=["mean", "weighted_mean", "eos_token", "last_token",
                                                       "bos_token"],
                   help="pooling mode (default: the model's saved setting, else mean)")
    p.add_argument("--no-bidirectional", action="store_true", help="keep causal attention")
    p.add_argument("--output", default=None, help="write the MTEB-layout result JSON here (and a .md summary)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per batch (sets the token budget); default: the encoder's device default")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per packed batch")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--task-name", default=None, help="name recorded in the result (default: from the data path)")
    p.add_argument("--progress", action="store_true", help="show progress bars on stderr")
    p.add_argument("--truncate-dim", type=int, default=None, metavar="D",
                   help="score the first D dimensions of each embedding (a Matryoshka-trained model's prefix)")


def add_subcommands(subparsers):
    """Add ``eval`` (with ``sts``, ``retrieval``, ``reranking``, ``classification``, ``pair-classification``,
    ``clustering``) to an argparse subparsers object.

    Each leaf parser sets ``func`` to :func:`run_eval`; the caller runs ``args.func(args)`` and exits with its
    return value.
    """
    ev = subparsers.add_parser("eval", help="evaluate an encoder on local STS / retrieval / reranking / "
                               "classification / pair-classification / clustering files",
                               description="Evaluate on local files; prints a summary table and, as the very last "
                                           "line, the main score (a fraction, e.g. 0.7712).")
    sub = ev.add_subparsers(dest="eval_task",
                            metavar="{" + ",".join(TASKS) + "}")
    sub.required = True

    p = sub.add_parser("sts", help="STS-B TSV or SICK file: Spearman of cosine similarity")
    p.add_argument("--data", required=True, help="STS-B style TSV (e.g. sts-dev.csv) or SICK_*.txt")
    p.add_argument("--instruction", default=None, help="instruction applied to both sentences (default: none)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--split", default=None, help="split name recorded in the result (default: from the file name: "
                   "dev/valid/trial -> validation, train -> train, else test)")
    _common_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("retrieval", help="BEIR folder: nDCG@10, MRR@10, Recall@100")
    p.add_argument("--data", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--instruction", default=DEFAULT_RETRIEVAL_INSTRUCTION,
                   help="instruction for queries only ('' for none; default: %(default)r)")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--max-docs", type=int, default=None, help="subset the corpus to about N documents (the chosen "
                   "queries' relevant documents are always kept; other documents, judged or not, fill up in file "
                   "order)")
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N judged queries")
    p.add_argument("--relevance-threshold", type=int, default=1,
                   help="qrels score counted as relevant for MRR and recall (default 1; 2 for TREC-DL style)")
    _common_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("reranking", help="queries with relevant and irrelevant candidates (e.g. SNLI triplets): "
                       "MAP, MRR@10, nDCG@10 (MTEB's Reranking)")
    p.add_argument("--data", required=True, help="JSONL / JSON / CSV / TSV: query with positive(s) and negative(s), "
                   "a row per query (lists) or per triplet (rows of one query are merged)")
    p.add_argument("--split", default=None, help="keep rows whose split column equals this (e.g. dev for SNLI's "
                   "triplet file) and record it as the result's split (default: all rows, recorded as test)")
    p.add_argument("--instruction", default=None, help="instruction for queries only (default: none)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N scored queries")
    p.add_argument("--at-k", type=int, default=10, help="cut-off of MRR and nDCG (default 10)")
    _common_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("classification", help="train/test CSV: logistic regression accuracy and macro-F1")
    p.add_argument("--data", required=True, help="training CSV with a header (text,label or text,category)")
    p.add_argument("--test", default=None, help="test CSV (default: split --data with --seed)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="test share when splitting --data")
    p.add_argument("--n-train", type=int, default=None, help="exact number of training rows")
    p.add_argument("--n-test", type=int, default=None, help="exact number of test rows")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed for splitting (default 0)")
    p.add_argument("--instruction", default=None, help="instruction applied to every text (default: none)")
    _common_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("pair-classification", help="labelled pairs (e.g. SNLI): average precision, best accuracy "
                       "and F1 over thresholds (MTEB's PairClassification)")
    p.add_argument("--data", required=True, help="SentEval folder (s1.<split>, s2.<split>, labels.<split>) or a "
                   "JSONL / CSV / TSV file with sentence1, sentence2 and label")
    p.add_argument("--split", default="test", help="the SentEval folder's split, read from its files; for a file, "
                   "the split recorded in the result (default: test; dev is recorded as validation)")
    p.add_argument("--instruction", default=None, help="instruction applied to both texts (default: none)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N pairs (counted after neutral pairs are left out)")
    _common_options(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("clustering", help="labelled CSV: mini-batch k-means V-measure (MTEB's bootstrapped "
                       "clustering)")
    p.add_argument("--data", required=True, help="CSV with a header (text,label or text,category)")
    p.add_argument("--limit", type=int, default=None, help="embed N texts drawn with --seed")
    p.add_argument("--n-experiments", type=int, default=10, help="bootstrap rounds (default 10)")
    p.add_argument("--cluster-size", type=int, default=CLUSTER_SIZE,
                   help="texts drawn with replacement per round (default: MTEB's %(default)s, whatever the data's "
                        "size)")
    p.add_argument("--seed", type=int, default=42, help="sampling and k-means seed (default 42)")
    p.add_argument("--instruction", default=None, help="instruction applied to every text (default: none)")
    _common_options(p)
    p.set_defaults(func=run_eval)
    return ev


def _load_model(args):
    from .cli import load_model

    return load_model(args)


def run_eval(args, model=None) -> int:
    """Run one ``eval`` subcommand from parsed args (``model`` overrides ``--model``, for tests); returns 0."""
    for name in ("limit", "at_k", "max_docs", "max_queries", "n_train", "n_test", "n_experiments", "cluster_size",
                 "truncate_dim", "batch_size", "max_batch_tokens"):  # before the model loads
        if getattr(args, name, None) is not None:
            check_count(name, getattr(args, name))
    if args.output:
        check_output_file(args.output)
    model = model if model is not None else _load_model(args)
    common = dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, task_name=args.task_name,
                  show_progress_bar=args.progress, truncate_dim=args.truncate_dim)
    if args.eval_task == "sts":
        result = evaluate_sts(model, args.data, instruction=args.instruction, limit=args.limit, split=args.split,
                              **common)
    elif args.eval_task == "retrieval":
        result = evaluate_retrieval(model, args.data, instruction=args.instruction, split=args.split,
                                    max_docs=args.max_docs, max_queries=args.max_queries,
                                    relevance_threshold=args.relevance_threshold, **common)
    elif args.eval_task == "reranking":
        result = evaluate_reranking(model, args.data, split=args.split, instruction=args.instruction,
                                    limit=args.limit, at_k=args.at_k, **common)
    elif args.eval_task == "classification":
        result = evaluate_classification(model, args.data, args.test, instruction=args.instruction,
                                         test_fraction=args.test_fraction, n_train=args.n_train,
                                         n_test=args.n_test, seed=args.seed, **common)
    elif args.eval_task == "clustering":
        result = evaluate_clustering(model, args.data, instruction=args.instruction, limit=args.limit,
                                     n_experiments=args.n_experiments, cluster_size=args.cluster_size,
                                     seed=args.seed, **common)
    elif args.eval_task == "pair-classification":
        result = evaluate_pair_classification(model, args.data, split=args.split, instruction=args.instruction,
                                              limit=args.limit, **common)
    else:
        raise ValueError(f"unknown eval task {args.eval_task!r}; expected one of {TASKS}")
    if args.output:
        save_result(result, args.output)
    print(summary_table(result), end="")
    if args.output:
        print(f"result written to {args.output}")
    print(f"main score ({main_metric_name(result)}):")
    print(f"{result['scores'][next(iter(result['scores']))][0]['main_score']:.6f}")
    return 0
