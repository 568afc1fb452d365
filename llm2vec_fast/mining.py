"""Hard-negative mining for supervised contrastive training: ``mine_hard_negatives`` and ``llm2vec-fast mine``.

For every query of a query / positive dataset, the encoder ranks a corpus (the dataset's positives and existing
negatives, plus any texts given) and the best-scoring documents that are *not* its positive become its hard
negatives, written in the JSONL layout that ``llm2vec-fast train supervised`` reads. The hazard of mining is the
false negative: a document as relevant as the positive, trained as if it were not. Three guards, all on by default:

* every positive of the same query text is excluded (datasets often pair one query with several positives), as are
  the query's own text and the texts of its existing negatives (kept in the output, ahead of the mined ones);
* a candidate must score below the positive: at most ``positive_score * (1 - relative_margin)`` (0.05 by default,
  NV-Retriever's "95 % of the positive" rule; a positive scoring 0 or less only needs to be beaten) and, when
  given, at most ``positive_score - absolute_margin``;
* candidates are taken from ranks ``[range_min, range_max)`` of the search, so ``range_min`` can skip the very top.

Queries carry the instruction (attended to, not pooled, as in training), documents none. Rows that get fewer than
``num_negatives`` mined negatives are reported and, unless ``keep_incomplete``, returned apart: training takes the
smallest number of negatives any example has, so one short row would lower it for the whole dataset.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .similarity import semantic_search
from .training.data import read_triplets, with_instruction

logger = logging.getLogger(__name__)

SAMPLING = ("top", "random")


def _check_args(num_negatives, range_min, range_max, relative_margin, absolute_margin, sampling):
    if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    if not isinstance(range_min, int) or range_min < 0:
        raise ValueError(f"range_min must be an int >= 0, got {range_min!r}")
    if not isinstance(range_max, int) or range_max < range_min + num_negatives:
        raise ValueError(f"range_max must be an int >= range_min + num_negatives = {range_min + num_negatives}, "
                         f"got {range_max!r}")
    if relative_margin is not None and not 0 <= relative_margin < 1:
        raise ValueError(f"relative_margin must be in [0, 1) or None, got {relative_margin!r}")
    if absolute_margin is not None and not (math.isfinite(absolute_margin) and absolute_margin >= 0):
        raise ValueError(f"absolute_margin must be a finite number >= 0 or None, got {absolute_margin!r}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")


def _example(i, ex) -> dict:
    """An example as mining reads it: string ``query`` and ``positive`` with text in them, and its ``negatives`` (a
    list), also from the ``negative`` key (a string or a list: sentence-transformers' and mining's own output)."""
    if not isinstance(ex, dict) or not isinstance(ex.get("query"), str) or not isinstance(ex.get("positive"), str):
        raise TypeError(f"example {i} must be a dict with string 'query' and 'positive', got {ex!r:.120}")
    for key in ("query", "positive"):
        if not ex[key].strip():
            raise ValueError(f"example {i} has a blank {key}: there is nothing to embed")
    negs = ex.get("negatives")
    if negs is None:
        negs = ex.get("negative")
    negs = [] if negs is None else [negs] if isinstance(negs, str) else negs
    if not isinstance(negs, (list, tuple)) or not all(isinstance(n, str) for n in negs):
        raise TypeError(f"example {i}: negatives must be a list of strings, got {negs!r:.120}")
    # a blank negative embeds to zeros: no document, so not kept (as blank candidates are not mined)
    return {**ex, "negatives": [n for n in negs if n.strip()]}


def _unique(texts) -> tuple[list[str], dict[str, int]]:
    ids: dict[str, int] = {}
    for t in texts:
        if t not in ids:
            ids[t] = len(ids)
    return list(ids), ids


def _encode(model, items, batch_size, max_batch_tokens, show_progress_bar, device, **extra) -> torch.Tensor:
    kw = dict(convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=show_progress_bar, **extra)
    if batch_size is not None:
        kw["batch_size"] = batch_size
    if max_batch_tokens is not None:
        kw["max_batch_tokens"] = max_batch_tokens
    emb = model.encode(items, **kw)
    emb = torch.as_tensor(np.asarray(emb) if not torch.is_tensor(emb) else emb).float()
    if emb.ndim != 2 or emb.shape[0] != len(items):
        raise ValueError(f"encoder returned shape {tuple(emb.shape)} for {len(items)} texts; expected "
                         f"[{len(items)}, D]")
    return emb.to(device)


def mine_hard_negatives(model, examples, *, corpus=None, instruction: str | None = None, num_negatives: int = 3,
                        range_min: int = 0, range_max: int = 100, relative_margin: float | None = 0.05,
                        absolute_margin: float | None = None, sampling: str = "top", keep_existing: bool = True,
                        keep_incomplete: bool = False, seed: int = 0, batch_size: int | None = None,
                        max_batch_tokens: int | None = None, show_progress_bar: bool = False,
                        search_device=None) -> tuple[list[dict], list[dict], dict]:
    """Mine hard negatives for query / positive examples with an encoder (see the module docstring for the rules).

    Args:
        model: anything with sentence-transformers' ``encode`` (an :class:`~llm2vec_fast.LLM2Vec`).
        examples: dicts with ``query`` and ``positive`` (and optionally ``negatives``, a list), as
            :func:`llm2vec_fast.training.data.read_triplets` returns them.
        corpus: more candidate documents (strings); the examples' positives and existing negatives are always
            candidates too.
        instruction: put on queries only, as in supervised training.
        num_negatives: mined negatives per example; range_min / range_max: the search ranks they come from.
        relative_margin / absolute_margin: the false-negative guards (``None`` turns one off).
        sampling: ``"top"`` (the best eligible candidates) or ``"random"`` (a seeded draw among them).
        keep_existing: keep an example's own negatives, ahead of the mined ones.
        keep_incomplete: return examples with fewer than ``num_negatives`` mined negatives among the complete ones.
        search_device: where the scores are computed (default: the model's device, else the CPU).

    Returns:
        ``(rows, incomplete, stats)``: output rows ``{"query", "positive", "negative": [texts], "positive_score",
        "negative_scores"}`` (scores of the mined negatives, cosine), the incomplete rows in the same layout, and
        counts.
    """
    _check_args(num_negatives, range_min, range_max, relative_margin, absolute_margin, sampling)
    examples = [_example(i, ex) for i, ex in enumerate(examples)]
    if not examples:
        raise ValueError("no examples to mine negatives for")
    if isinstance(corpus, str):
        raise TypeError("corpus must be a list of document strings, got one string")
    extra = [] if corpus is None else list(corpus)
    for i, t in enumerate(extra):
        if not isinstance(t, str):
            raise TypeError(f"corpus item {i} must be a string, got {type(t).__name__}")
    extra = [t for t in extra if t.strip()]  # a blank text embeds to zeros: no document to mine
    device = search_device or getattr(model, "device", None) or "cpu"

    queries, qid = _unique(ex["query"] for ex in examples)
    # candidates: every positive and existing negative of the data (real documents), then the extra corpus
    docs, did = _unique([ex["positive"] for ex in examples]
                        + [n for ex in examples for n in ex["negatives"] if n.strip()] + extra)
    # every positive of a query text, whichever row pairs them
    positives_of: dict[str, set[int]] = {}
    for ex in examples:
        positives_of.setdefault(ex["query"], set()).add(did[ex["positive"]])

    # LLM2Vec takes [instruction, text] pairs, as in training
    if callable(getattr(model, "tokenize_items", None)) or not instruction:
        q_emb = _encode(model, [with_instruction(q, instruction) for q in queries], batch_size, max_batch_tokens,
                        show_progress_bar, device)
    else:  # another encoder (sentence-transformers): the instruction as its prompt
        q_emb = _encode(model, queries, batch_size, max_batch_tokens, show_progress_bar, device,
                        prompt=f"{instruction.strip()}; ")
    d_emb = _encode(model, docs, batch_size, max_batch_tokens, show_progress_bar, device)

    # one search per example (its exclusions depend on its existing negatives): the query's row, rank range_max
    excludes = []
    for ex in examples:
        ids = set(positives_of[ex["query"]])
        if ex["query"] in did:
            ids.add(did[ex["query"]])
        for n in ex["negatives"] if keep_existing else []:
            if n in did:
                ids.add(did[n])
        excludes.append(sorted(ids))
    rows_q = q_emb[torch.tensor([qid[ex["query"]] for ex in examples], device=q_emb.device)]
    hits = semantic_search(rows_q, d_emb, top_k=range_max, exclude=excludes)
    pos_scores = (rows_q * d_emb[torch.tensor([did[ex["positive"]] for ex in examples],
                                              device=d_emb.device)]).sum(-1).tolist()

    rng = random.Random(seed)
    rows, incomplete = [], []
    dropped_by_margin = 0
    for ex, found, pos in zip(examples, hits, pos_scores, strict=True):
        bound = math.inf
        if relative_margin is not None:
            bound = min(bound, pos * (1 - relative_margin) if pos > 0 else pos)
        if absolute_margin is not None:
            bound = min(bound, pos - absolute_margin)
        window = found[range_min:range_max]
        eligible = [h for h in window if h["score"] <= bound]
        dropped_by_margin += len(window) - len(eligible)
        if sampling == "random" and len(eligible) > num_negatives:
            eligible = sorted(rng.sample(eligible, num_negatives), key=lambda h: -h["score"])
        picked = eligible[:num_negatives]
        existing = list(ex["negatives"]) if keep_existing else []
        row = {"query": ex["query"], "positive": ex["positive"],
               "negative": existing + [docs[h["corpus_id"]] for h in picked],
               "positive_score": round(pos, 6), "negative_scores": [round(h["score"], 6) for h in picked]}
        (rows if len(picked) == num_negatives or keep_incomplete else incomplete).append(row)
    every = rows + incomplete
    mined = [s for r in every for s in r["negative_scores"]]
    stats = {"examples": len(examples), "queries": len(queries), "corpus": len(docs),
             "complete": sum(len(r["negative_scores"]) == num_negatives for r in every),
             "incomplete": sum(len(r["negative_scores"]) < num_negatives for r in every),
             "written": len(rows), "set_apart": len(incomplete), "candidates_over_margin": dropped_by_margin,
             "mean_positive_score": float(np.mean(pos_scores)),
             "mean_negative_score": float(np.mean(mined)) if mined else None}
    return rows, incomplete, stats


def write_jsonl(rows, path) -> Path:
    """Write rows as JSON lines atomically: a failed run never leaves a partial file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_corpus(path, text_field: str = "text") -> list[str]:
    """Candidate documents: a .txt file (a non-empty line each) or .jsonl with a ``text_field`` per line."""
    from .cli import CLIError, iter_file

    if not Path(path).is_file():
        raise ValueError(f"corpus file {str(path)!r} does not exist")
    try:
        out = [text for _, text in iter_file(Path(path), "", text_field) if text.strip()]
    except CLIError as e:
        raise ValueError(str(e)) from e
    if not out:
        raise ValueError(f"corpus file {str(path)!r} has no texts")
    return out


# ---------------------------------------------------------------------- CLI
def add_subcommands(subparsers):
    """Add ``mine`` to an argparse subparsers object."""
    from .cli import _model_options

    p = subparsers.add_parser(
        "mine", help="mine hard negatives for supervised training data",
        description="For each query / positive row of --input (JSONL or CSV, the columns `train supervised` reads), "
                    "rank the dataset's positives and negatives (and --corpus) with the encoder and write the best "
                    "documents that are not its positive, below its positive's score, as hard negatives: JSONL "
                    "that `train supervised` reads.")
    p.add_argument("--input", "-i", required=True, type=Path, help="query / positive (/ negative) JSONL or CSV")
    p.add_argument("--output", "-o", required=True, type=Path, help="JSONL written atomically; rows that got fewer "
                   "than --num-negatives go to OUTPUT with .incomplete.jsonl instead (unless --keep-incomplete)")
    p.add_argument("--corpus", type=Path, default=None, help="more candidate documents: .txt (a line each) or "
                   ".jsonl with \"text\"; the input's positives and negatives are always candidates")
    p.add_argument("--corpus-text-field", default="text", help="the field of a .jsonl corpus that holds the text")
    p.add_argument("--split", default=None, help="only rows whose split column has this value")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--instruction", default=None, help="instruction for the queries (as in training)")
    p.add_argument("--num-negatives", type=int, default=3, help="mined negatives per row (default 3)")
    p.add_argument("--range-min", type=int, default=0, help="skip this many best candidates (default 0)")
    p.add_argument("--range-max", type=int, default=100, help="consider candidates up to this rank (default 100)")
    p.add_argument("--relative-margin", type=float, default=0.05, help="a negative scores at most positive × (1 - "
                   "this); default 0.05; a negative value (e.g. -1) turns it off")
    p.add_argument("--absolute-margin", type=float, default=None, help="a negative scores at most positive - this")
    p.add_argument("--sampling", default="top", choices=SAMPLING, help="the best eligible candidates (top) or a "
                   "seeded random draw among them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drop-existing", action="store_true", help="do not keep the input's own negatives")
    p.add_argument("--keep-incomplete", action="store_true", help="write rows with fewer mined negatives too")
    p.add_argument("--batch-size", type=int, default=None, help="texts per batch (sets the token budget)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per packed batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    _model_options(p)
    p.set_defaults(func=run_mine)
    return p


def incomplete_path(output: Path) -> Path:
    name = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(name + ".incomplete.jsonl")


def run_mine(args, model=None) -> int:
    """``llm2vec-fast mine``: returns 0; prints counts, and where rows went, on stderr."""
    from .cli import CLIError, load_model

    if args.output.suffix.lower() != ".jsonl":
        raise CLIError(f"--output must be a .jsonl file, got {str(args.output)!r}")
    if not args.input.is_file():
        raise CLIError(f"--input file {str(args.input)!r} does not exist")
    if args.output.resolve() == args.input.resolve() or incomplete_path(args.output).resolve() == args.input.resolve():
        raise CLIError(f"--output {str(args.output)!r} would overwrite the --input file: write the mined rows to "
                       "another file")
    try:
        examples = read_triplets(args.input, split=args.split, limit=args.limit)
        corpus = read_corpus(args.corpus, args.corpus_text_field) if args.corpus else None
        margin = None if args.relative_margin is not None and args.relative_margin < 0 else args.relative_margin
        _check_args(args.num_negatives, args.range_min, args.range_max, margin, args.absolute_margin, args.sampling)
    except (ValueError, UnicodeDecodeError) as e:
        msg = str(e)
        for name in ("num_negatives", "range_min", "range_max", "relative_margin", "absolute_margin", "sampling",
                     "limit"):
            msg = msg.replace(name, "--" + name.replace("_", "-"))
        raise CLIError(msg) from e
    model = model if model is not None else load_model(args)
    rows, incomplete, stats = mine_hard_negatives(
        model, examples, corpus=corpus, instruction=args.instruction, num_negatives=args.num_negatives,
        range_min=args.range_min, range_max=args.range_max, relative_margin=margin,
        absolute_margin=args.absolute_margin, sampling=args.sampling, keep_existing=not args.drop_existing,
        keep_incomplete=args.keep_incomplete, seed=args.seed, batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens, show_progress_bar=not args.no_progress)
    write_jsonl(rows, args.output)
    aside = incomplete_path(args.output)
    if incomplete:
        write_jsonl(incomplete, aside)
    elif aside.exists():
        aside.unlink()  # a previous run's leftovers would be mistaken for this run's
    neg = stats["mean_negative_score"]
    print(f"mined {stats['examples']} rows ({stats['queries']} queries, {stats['corpus']} candidate documents): "
          f"{stats['written']} written to {args.output}"
          + (f", {len(incomplete)} with fewer than {args.num_negatives} negatives to {aside}" if incomplete else "")
          + (f", {stats['incomplete']} of them with fewer than {args.num_negatives}"
             if args.keep_incomplete and stats["incomplete"] else "")
          + f"; mean cosine: positive {stats['mean_positive_score']:.4f}"
          + (f", mined negatives {neg:.4f}" if neg is not None else "")
          + f"; {stats['candidates_over_margin']} candidates skipped by the margin", file=sys.stderr)
    return 0
