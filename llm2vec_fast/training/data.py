"""Training data: text files → MNTP blocks and masking collator; sentence, pair and triplet datasets for contrastive
training; an ordering that keeps each (global) batch inside one source dataset.

Nothing here touches a model: the collators only need a tokenizer.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import check_count, iter_jsonl

# ----------------------------------------------------------------------------------------------------------------
# text files
# ----------------------------------------------------------------------------------------------------------------


def _read_text(path) -> str:
    """A UTF-8 text file's contents (without a byte-order mark, which spreadsheet exports write); a file that is not
    UTF-8 is a ValueError naming the file and the place."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert the file to UTF-8") from None


def read_documents(path: str | Path, split: str = "auto") -> list[str]:
    """Read a plain text file as a list of documents (a ``.jsonl`` file: each object's ``text`` field is one; a
    ``.csv`` / ``.tsv`` file is refused: its header and separators would become training text).

    ``split``: ``"line"`` = one document per non-empty line; ``"blank"`` = documents separated by blank lines (lines
    holding only whitespace count as blank; the lines of one document are joined with a newline); ``"auto"`` = ``blank``
    when the file contains at least one blank line between two non-blank lines, else ``line``.
    """
    if split not in ("auto", "line", "blank"):
        raise ValueError(f"split must be 'auto', 'line' or 'blank', got {split!r}")
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl_texts(path)
    if suffix in (".csv", ".tsv"):
        raise ValueError(f"{path}: a {suffix} file, where plain text is expected (one document or sentence per line; "
                         "its header and separators would be trained on as text): write its text column to a .txt "
                         "file, or give a .jsonl file with a 'text' field")
    lines = _read_text(path).splitlines()
    if split == "auto":
        stripped = [bool(l.strip()) for l in lines]
        first = next((i for i, s in enumerate(stripped) if s), None)
        last = max((i for i, s in enumerate(stripped) if s), default=None)
        inner_blank = first is not None and not all(stripped[first:last + 1])
        split = "blank" if inner_blank else "line"
    if split == "line":
        return [l.strip() for l in lines if l.strip()]
    docs, cur = [], []
    for l in lines:
        if l.strip():
            cur.append(l.strip())
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    if cur:
        docs.append("\n".join(cur))
    return docs


def _jsonl_texts(path) -> list[str]:
    """The ``text`` field of every object of a JSONL file (blank lines skipped; one document or sentence each)."""
    out = []
    for n, row in iter_jsonl(_read_text(path).split("\n"), path):
        value = row.get("text")
        if not isinstance(value, str):
            raise ValueError(f"{path}:{n}: expected an object with a 'text' string, got "
                             f"{json.dumps(row, ensure_ascii=False)[:80]}")
        if value.strip():
            out.append(value.strip())
    return out


def read_sentences(path: str | Path, limit: int | None = None) -> list[str]:
    """One sentence per non-empty line (the SimCSE wiki1m format), or the ``text`` field of each JSONL object."""
    check_count("limit", limit, optional=True)
    out = read_documents(path, split="line")
    return out[:limit] if limit else out


# ----------------------------------------------------------------------------------------------------------------
# MNTP: blocks + masking
# ----------------------------------------------------------------------------------------------------------------


class BlockDataset(torch.utils.data.Dataset):
    """Fixed-length token blocks: every document tokenized (with the tokenizer's own special tokens, as the original
    ``run_mntp`` does), concatenated, and cut into ``block_size`` tokens; the tail shorter than a block is dropped."""

    def __init__(self, documents: Sequence[str], tokenizer, block_size: int = 512, max_blocks: int | None = None):
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 (a token predicts the next), got {block_size}")
        ids: list[int] = []
        step = 1000
        for i in range(0, len(documents), step):
            for row in tokenizer(list(documents[i:i + step]), add_special_tokens=True)["input_ids"]:
                ids.extend(row)
            if max_blocks is not None and len(ids) >= max_blocks * block_size:
                break
        n = len(ids) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n == 0:
            raise ValueError(f"the text gives {len(ids)} tokens, fewer than one block of {block_size}")
        self.blocks = torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)
        self.block_size = block_size

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i]}


MASK_TOKEN_KINDS = ("auto", "blank", "eos", "mask", "auto-eos", "auto-mask")


def resolve_mask_token(tokenizer, kind: str = "auto") -> int:
    """Pick (and set) the tokenizer's mask token; returns its id.

    ``auto``: the tokenizer's own mask token when it has one, else ``"_"`` (the original LLM2Vec choice for Llama and
    Mistral tokenizers); ``blank`` forces ``"_"``; ``eos`` uses the end-of-sequence token; ``mask`` adds a new
    ``"<mask>"`` token (the caller must then resize the model's embeddings to ``len(tokenizer)``). ``auto-eos`` and
    ``auto-mask``: the tokenizer's own mask token when it has one, else ``eos`` / ``mask`` (the original run_mntp's
    ``mask_token_type``, which applies only to a tokenizer without a mask token).
    """
    if kind not in MASK_TOKEN_KINDS:
        raise ValueError(f"mask token kind must be one of {', '.join(MASK_TOKEN_KINDS)}, got {kind!r}")
    if kind.startswith("auto") and tokenizer.mask_token is not None:
        return tokenizer.mask_token_id
    kind = {"auto-eos": "eos", "auto-mask": "mask"}.get(kind, kind)
    if kind in ("auto", "blank"):
        tid = tokenizer.convert_tokens_to_ids("_")
        if tid is None or tid == tokenizer.unk_token_id:
            enc = tokenizer("_", add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"'_' is not a single token in this tokenizer ({enc}); use --mask-token eos or mask")
            tid = enc[0]
            tokenizer.mask_token = tokenizer.convert_ids_to_tokens(tid)
        else:
            tokenizer.mask_token = "_"
        return tid
    if kind == "eos":
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos token to use as mask token")
        tokenizer.mask_token = tokenizer.eos_token
        return tokenizer.eos_token_id
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    return tokenizer.mask_token_id


@dataclass
class MNTPCollator:
    """Stack blocks and mask them for masked next-token prediction.

    A token is selected with probability ``mlm_probability``; special tokens (``tokenizer.all_special_ids``, the
    mask token excluded) are never selected. Selected tokens become the mask token with probability ``mask_replace``,
    a uniformly random vocabulary token with probability ``random_replace``, and stay unchanged otherwise.
    ``labels`` hold the original token at selected positions and ``-100`` elsewhere; the model predicts position i
    from its output at i − 1 (the shift is the loss's job, not the collator's).

    Recipes: ``MNTPCollator.llama(tok)`` = 0.2 with 80/10/10 (the BERT rule, the original's Llama default);
    ``MNTPCollator.mistral(tok)`` = 0.8 with every selected token → mask token.
    """

    tokenizer: object
    mask_token_id: int
    mlm_probability: float = 0.2
    mask_replace: float = 0.8
    random_replace: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.mask_replace < 0 or self.random_replace < 0 or self.mask_replace + self.random_replace > 1 + 1e-9:
            raise ValueError(
                f"mask_replace + random_replace must be within [0, 1], got {self.mask_replace} + {self.random_replace}"
            )
        special = set(self.tokenizer.all_special_ids) - {self.mask_token_id}
        self._special = torch.tensor(sorted(special), dtype=torch.long)
        self._vocab = len(self.tokenizer)

    @classmethod
    def recipe(cls, name: str, tokenizer, mask_token_id: int, mlm_probability: float | None = None):
        """``llama`` (p 0.2, 80/10/10) or ``mistral`` (p 0.8, all → mask); ``mlm_probability`` overrides p."""
        if name == "llama":
            c = dict(mlm_probability=0.2, mask_replace=0.8, random_replace=0.1)
        elif name == "mistral":
            c = dict(mlm_probability=0.8, mask_replace=1.0, random_replace=0.0)
        else:
            raise ValueError(f"masking recipe must be 'llama' or 'mistral', got {name!r}")
        if mlm_probability is not None:
            c["mlm_probability"] = mlm_probability
        return cls(tokenizer, mask_token_id, **c)

    def __call__(self, examples: list[dict]) -> dict:
        ids = torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])
        return self.mask(ids)

    def mask(self, input_ids: torch.Tensor) -> dict:
        """Mask a [B, L] batch (on its own device, with the global RNG of that device); returns ``input_ids`` (a
        masked copy) and ``labels``."""
        dev = input_ids.device
        input_ids = input_ids.clone()
        labels = input_ids.clone()
        prob = torch.full(labels.shape, self.mlm_probability, device=dev)
        prob.masked_fill_(torch.isin(labels, self._special.to(dev)), 0.0)
        selected = torch.bernoulli(prob).bool()
        labels[~selected] = -100
        to_mask = torch.bernoulli(torch.full(labels.shape, self.mask_replace, device=dev)).bool() & selected
        input_ids[to_mask] = self.mask_token_id
        if self.random_replace > 0:
            # of the tokens not turned into the mask token, this share becomes a random token
            p_rand = self.random_replace / max(1.0 - self.mask_replace, 1e-12)
            to_rand = torch.bernoulli(torch.full(labels.shape, min(p_rand, 1.0), device=dev)).bool() & selected \
                & ~to_mask
            input_ids[to_rand] = torch.randint(self._vocab, labels.shape, dtype=torch.long, device=dev)[to_rand]
        return {"input_ids": input_ids, "labels": labels}


def stack_blocks(examples: list[dict]) -> dict:
    """Collate unmasked blocks into ``{"input_ids": [B, L]}`` (the MNTP trainer masks them in the training step)."""
    return {"input_ids": torch.stack([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])}


# ----------------------------------------------------------------------------------------------------------------
# contrastive data
# ----------------------------------------------------------------------------------------------------------------


class ListDataset(torch.utils.data.Dataset):
    """A list of examples (anything the collator understands)."""

    def __init__(self, items: Sequence):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


_QUERY_KEYS = ("query", "anchor", "sent0", "q")
_POS_KEYS = ("positive", "pos", "sent1", "document", "d")
_NEG_KEYS = ("negative", "neg", "hard_neg", "hard_negative")


def _pick(row: dict, keys, what: str, path, required: bool = True, where: str = ""):
    for k in keys:
        if k in row and row[k] is not None and not (isinstance(row[k], str) and not row[k].strip()):
            return row[k]
    if required:
        present = [k for k in keys if k in row]
        if present:
            raise ValueError(f"{path}{where}: the {what} ({present[0]!r}) is empty")
        raise ValueError(f"{path}{where}: a row has no {what} column (looked for {', '.join(keys)}); got {sorted(row)}")
    return None


def _negatives(row: dict) -> list[str]:
    """Every hard negative of a row: a list value (E5-style JSONL) or ``negative`` / ``negative_1``, ``negative_2``,
    … columns (sentence-transformers style), in that order; empty values are skipped."""
    v = _pick(row, _NEG_KEYS, "negative", None, required=False)
    out = [x for x in v if not _blank(x)] if isinstance(v, list) else ([v] if v is not None else [])
    numbered = sorted((int(k.rsplit("_", 1)[1]), k) for k in row
                      if k.rsplit("_", 1)[0] in _NEG_KEYS and k.rsplit("_", 1)[-1].isdigit())
    out += [row[k] for _, k in numbered if not _blank(row[k])]
    return out


def _blank(x) -> bool:
    # None, "" or whitespace only: no text (it would embed to a zero vector)
    return x is None or (isinstance(x, str) and not x.strip())


def read_triplets(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Read query/positive/(hard negative) examples from JSONL or CSV.

    Columns: query = one of ``query, anchor, sent0``; positive = ``positive, pos, sent1, document``; negative (optional)
    = ``negative, neg, hard_neg, hard_negative``. A ``split`` column, when present and ``split`` is given, filters
    rows (the SNLI dev/test triplet file has one). Several hard negatives per query: a list value (JSONL) or columns
    ``negative_1``, ``negative_2``, …. Returns dicts with keys ``query``, ``positive``, ``negative`` (the first hard
    negative, ``None`` when absent) and ``negatives`` (all of them, possibly empty).
    """
    check_count("limit", limit, optional=True)
    path = Path(path)
    text = _read_text(path)
    if path.suffix in (".jsonl", ".json"):
        rows = list(iter_jsonl(text.split("\n"), path))
    elif path.suffix in (".csv", ".tsv"):
        stream = io.StringIO(text, newline="")
        reader = csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv" \
            else csv.DictReader(stream)
        rows = []
        for r in reader:
            _check_row_width(path, reader, r)
            rows.append((reader.line_num, r))
    else:
        raise ValueError(f"{path}: expected a .jsonl, .json, .csv or .tsv file")
    has_split = any("split" in r for _, r in rows)
    if split is not None and not has_split:
        raise ValueError(f"{path}: split {split!r} given, but the file has no split column")
    values = sorted({str(r.get("split", "")).strip() for _, r in rows}) if has_split else []
    out, held_out = [], 0
    for n, r in rows:
        value = str(r.get("split", "")).strip().lower() if has_split else ""
        if split is not None and value != split.strip().lower():
            continue
        if split is None and value == "test":
            held_out += 1
        negs = _negatives(r)
        where = f":{n}"
        bad = [x for x in negs if not isinstance(x, str)]
        if bad:
            raise ValueError(f"{path}{where}: hard negatives must be strings, got {json.dumps(bad[0])}")
        ex = {"query": _pick(r, _QUERY_KEYS, "query", path, where=where),
              "positive": _pick(r, _POS_KEYS, "positive", path, where=where),
              "negative": negs[0] if negs else None, "negatives": negs}
        for what in ("query", "positive"):
            if not isinstance(ex[what], str):  # a number, a list or an object: refused now, not mid-training
                raise ValueError(f"{path}{where}: the {what} must be a string, got {json.dumps(ex[what])[:80]}")
        out.append(ex)
        if limit and len(out) >= limit:
            break
    if held_out:
        logger.warning("%s: %d examples of its split column are test rows, and no split was given: they are trained "
                       "on (give a split, e.g. dev, to keep them out)", path, held_out)
    if not out:
        raise ValueError(f"{path}: no examples read" + (f" for split {split!r} (the split column holds "
                                                          f"{values})" if split is not None else ""))
    return out


_TEXT1_KEYS = ("sentence1", "sentence_A", "sentence_a", "text1", "s1", "anchor", "query")
_TEXT2_KEYS = ("sentence2", "sentence_B", "sentence_b", "text2", "s2", "positive", "document")
_SCORE_KEYS = ("score", "similarity", "relatedness_score", "label", "gold_score")
_SPLIT_KEYS = ("split", "SemEval_set")
# the gold-score scales of the STS files that evaluation.load_sts reads
STS_RANGES = {"stsb": (0.0, 5.0), "sick": (1.0, 5.0)}
logger = logging.getLogger(__name__)


def _is_stsb_row(first_line: str) -> bool:
    """Whether a file's first line is an STS-B row (genre, file, year, id, score, s1, s2: no header)."""
    cols = first_line.rstrip("\r").split("\t")
    if len(cols) < 7:
        return False
    try:
        float(cols[4])
    except ValueError:
        return False
    return True


def _table_records(path: Path, text: str) -> list[tuple[str, dict]]:
    """``(place, row)`` of a JSONL / JSON-array / CSV / TSV file; CSV and TSV rows must fit their header."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        bad = [i for i, x in enumerate(items) if not isinstance(x, dict)]
        if bad:
            raise ValueError(f"{path}: item {bad[0]} of the JSON array is not an object")
        return [(f"{path}: item {i}", x) for i, x in enumerate(items)]
    if path.suffix in (".jsonl", ".json"):
        return [(f"{path}:{n}", r) for n, r in iter_jsonl(text.split("\n"), path)]
    stream = io.StringIO(text, newline="")
    # TSV without quoting, as STS-B's and GLUE's files are written: a quote there is text
    reader = csv.DictReader(stream) if path.suffix == ".csv" else csv.DictReader(stream, delimiter="\t",
                                                                                 quoting=csv.QUOTE_NONE)
    header = reader.fieldnames or []
    for keys, what in ((_TEXT1_KEYS, "first text"), (_TEXT2_KEYS, "second text"), (_SCORE_KEYS, "score")):
        if not any(k in header for k in keys):
            raise ValueError(f"{path}: the header (line 1: {header}) has no {what} column (looked for "
                             f"{', '.join(keys)}); a file without a header line needs one, or the STS-B layout "
                             "(genre, file, year, id, score, s1, s2)")
    out = []
    for r in reader:
        _check_row_width(path, reader, r)
        out.append((f"{path}:{reader.line_num}", r))
    return out


def _check_row_width(path, reader, row: dict) -> None:
    """A csv.DictReader row must have the header's number of fields: more go under the key None, fewer leave None
    values (a short row would silently lose its last columns, a hard negative say)."""
    header = len(reader.fieldnames or [])
    if None in row:
        raise ValueError(f"{path}:{reader.line_num}: {header + len(row[None])} fields for a header of {header}; "
                         "quote fields that hold the delimiter")
    if any(v is None for v in row.values()):
        have = sum(v is not None for v in row.values())
        raise ValueError(f"{path}:{reader.line_num}: {have} fields for a header of {header}; every row needs all "
                         "of them (an empty field is written as nothing between two delimiters)")


def read_scored_pairs(path: str | Path, limit: int | None = None,
                      split: str | None = None) -> tuple[list[dict], tuple[float, float] | None]:
    """Read two texts and a similarity score per row: ``(rows, scale)``.

    Files: an STS-B TSV (genre, file, year, id, score, s1, s2, no header; whatever the file's suffix), scale 0–5; a
    SICK file (tab-separated, header ``pair_ID sentence_A sentence_B relatedness_score ...``), scale 1–5; or JSONL,
    a JSON array, CSV or TSV (``.tsv`` / ``.txt``) with a header, the texts in ``sentence1`` / ``sentence2`` (or
    ``sentence_A``/``sentence_B``, ``text1``/``text2``, ``s1``/``s2``, ``anchor``/``positive``,
    ``query``/``document``) and the score in ``score`` (or ``similarity``, ``relatedness_score``, ``label``,
    ``gold_score``), scale None (unknown). ``split`` keeps the rows whose ``split`` or ``SemEval_set`` column
    (SICK's full file: TRAIN / TRIAL / TEST) equals it, case-insensitively. Rows are dicts ``{"text1", "text2",
    "score"}``; an empty text or a score that is not a finite number is a ValueError naming the line.
    """
    check_count("limit", limit, optional=True)
    path = Path(path)
    text = _read_text(path)
    if path.suffix not in (".jsonl", ".json") and _is_stsb_row(text.split("\n", 1)[0]):
        if split is not None:
            raise ValueError(f"{path}: an STS-B file holds one split and has no split column; split {split!r} "
                             "cannot filter it")
        from ..evaluation import load_sts

        s1, s2, gold = load_sts(path)
        records = [(f"{path}: pair {i + 1}", {"sentence1": a, "sentence2": b, "score": g})
                   for i, (a, b, g) in enumerate(zip(s1, s2, gold, strict=True))]
        scale = STS_RANGES["stsb"]
    elif path.suffix in (".jsonl", ".json", ".csv", ".tsv", ".txt"):
        records = _table_records(path, text)
        scale = STS_RANGES["sick"] if text.split("\n", 1)[0].split("\t")[0].strip() == "pair_ID" else None
    else:
        raise ValueError(f"{path}: expected an STS-B or SICK file, or a .jsonl, .json, .csv, .tsv or .txt file with "
                         "two text columns and a score column")
    split_key = next((k for k in _SPLIT_KEYS if records and k in records[0][1]), None)
    if split is not None and split_key is None:
        raise ValueError(f"{path}: split {split!r} given, but the file has no split column ({', '.join(_SPLIT_KEYS)})")
    rows, held_out = [], 0
    for where, r in records:
        if split_key is not None:
            value = str(r.get(split_key, "")).strip().lower()
            if split is None:
                held_out += value == "test"
            elif value != split.lower():
                continue
        t1 = _pick(r, _TEXT1_KEYS, "first text", path, where=where[len(str(path)):])
        t2 = _pick(r, _TEXT2_KEYS, "second text", path, where=where[len(str(path)):])
        raw = _pick(r, _SCORE_KEYS, "score", path, where=where[len(str(path)):])
        if isinstance(raw, bool):
            raise ValueError(f"{where}: the score {raw!r} is a boolean; give a number")
        try:
            score = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the score {raw!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{where}: the score {raw!r} is not a finite number")
        if not isinstance(t1, str) or not isinstance(t2, str):
            raise ValueError(f"{where}: the texts must be strings, got {json.dumps([t1, t2])[:120]}")
        if not t1.strip() or not t2.strip():
            raise ValueError(f"{where}: a text of the pair is empty: {[t1, t2]}")
        rows.append({"text1": t1, "text2": t2, "score": score})
        if limit and len(rows) >= limit:
            break
    if held_out:
        logger.warning("%s: %d pairs of its %s column are TEST pairs, and no split was given: they are trained on "
                       "(give a split, e.g. TRAIN, to keep them out)", path, held_out, split_key)
    if not rows:
        raise ValueError(f"{path}: no scored pairs read" + (f" for split {split!r}" if split else ""))
    return rows, scale


def rescale_scores(rows: list[dict], scale: tuple[float, float] | None, path="") -> list[dict]:
    """Rows with their scores mapped linearly from ``scale`` (low, high) to [0, 1]; ``scale`` None leaves them as
    they are. Scores outside ``scale``, or pairs that all have one score (nothing to learn an order from), are
    ValueErrors."""
    scores = [r["score"] for r in rows]
    if len(set(scores)) < 2:
        raise ValueError(f"{path}: every pair has the score {scores[0]}; scored-pair training needs pairs of "
                         "different scores")
    if scale is None:
        return list(rows)
    lo, hi = float(scale[0]), float(scale[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{path}: the score range {list(scale)} is empty or not finite: give (low, high) with "
                         "low < high")
    out = [x for x in scores if not lo <= x <= hi]
    if out:
        raise ValueError(f"{path}: score {out[0]} lies outside the score range [{lo}, {hi}]; give the range that "
                         "the data's scores come from")
    return [{**r, "score": (r["score"] - lo) / (hi - lo)} for r in rows]


def one_dataset_per_batch(datasets: dict[str, list], global_batch_size: int, seed: int = 42) -> list:
    """Order examples so that every run of ``global_batch_size`` consecutive examples comes from one dataset.

    Each dataset is shuffled, cut into full global batches (the remainder is dropped, as the original does), and the
    batches of all datasets are shuffled together. Read with a sequential sampler, each device then gets its share of
    one global batch (accelerate shards consecutive per-device batches), so cross-device negatives stay in-domain.
    Each example is returned as ``(dataset_name, example)``.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    rng = random.Random(seed)
    batches = []
    for name, items in datasets.items():
        idx = list(range(len(items)))
        rng.shuffle(idx)
        for i in range(0, len(idx) - global_batch_size + 1, global_batch_size):
            batches.append([(name, items[j]) for j in idx[i:i + global_batch_size]])
    short = {name: len(items) for name, items in datasets.items() if len(items) < global_batch_size}
    if short:
        raise ValueError(f"{', '.join(f'{n} ({k} examples)' for n, k in short.items())}: fewer examples than one "
                         f"batch of {global_batch_size} (batch size x devices), so "
                         f"{'it' if len(short) == 1 else 'they'} would add nothing; leave "
                         f"{'it' if len(short) == 1 else 'them'} out or use a smaller batch")
    rng.shuffle(batches)
    return [x for b in batches for x in b]


def with_instruction(text: str, instruction: str | None):
    """A query item as the encoder takes it: ``[instruction, text]`` (the encoder pools the text only), or the text.

    The original joins a training query as ``f"{instruction}; " + separator + text``; we pass the instruction with
    the same ``"; "`` suffix and let the encoder's tokenize mark where the text starts.
    """
    if not instruction:
        return text
    return [f"{instruction.strip()}; ", text]
