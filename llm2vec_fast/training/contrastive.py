"""Contrastive training on transformers' Trainer: unsupervised SimCSE (LLM2Vec step 3), supervised
query / positive / hard-negative training, and training on scored pairs (STS-style data: CoSENT, AnglE or cosine MSE).

The encoder is :class:`llm2vec_fast.LLM2Vec`: texts are tokenized into packed features and pooled through the
masked-pooling op (Triton on CUDA), so the gradient flows through the pooling kernel's backward. A fresh LoRA adapter
trains on top of the base model, into which an MNTP adapter (if any) has been merged. Queries, positives and
negatives of a batch run as one packed forward; with ``gradcache_chunk_size`` (texts per chunk) or
``gradcache_chunk_tokens`` (tokens per chunk: a bound on each chunk's activation memory) the batch runs in chunks
through :mod:`.gradcache`.

Python API::

    from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive
    train_contrastive(ContrastiveArguments(mode="simcse", model="out/mntp", train_files=["wiki1m.txt"],
                                           output_dir="out/simcse"))
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..cpu_memory import cpu_work
from ..encoder import _normalize_inputs, pack, write_encoder_config
from .common import (
    LORA_TARGETS,
    TRAINING_NAME,
    AdapterTrainer,
    add_lora,
    add_step_callbacks,
    as_lists,
    check_run_arguments,
    enable_checkpointing,
    loss_history,
    mixed_precision,
    prepare_output_dir,
    run_identity,
    schedule_steps,
    training_arguments,
    write_json,
)
from .data import (
    ListDataset,
    one_dataset_per_batch,
    read_scored_pairs,
    read_sentences,
    read_triplets,
    rescale_scores,
    with_instruction,
)
from .gradcache import grad_cache_step, token_chunk_sizes
from .losses import PAIR_LOSSES, check_matryoshka, gist_loss, hard_negative_nll_loss, scored_pair_loss
from .monitor import EvalArguments, add_eval_callback, encoder_evaluators, load_best

logger = logging.getLogger(__name__)

# the original recipes' defaults per mode
RECIPES = {
    "simcse": dict(batch_size=128, max_length=128, learning_rate=3e-5, scale=20.0, attention_dropout=0.3,
                   warmup_steps=0),
    "supervised": dict(batch_size=64, max_length=512, learning_rate=2e-4, scale=50.0, attention_dropout=0.0,
                       warmup_steps=300),
    # sentence-transformers' CoSENT / AnglE defaults (scale 20, batch 16 in its STS-B example) with the
    # supervised stage's LoRA learning rate; STS sentences are short
    "scored": dict(batch_size=16, max_length=128, learning_rate=2e-4, scale=20.0, attention_dropout=0.0,
                   warmup_steps=100),
}
# the loss of each mode: the first is its default
LOSSES = {"simcse": ("infonce",), "supervised": ("infonce",), "scored": PAIR_LOSSES}


@dataclass
class ContrastiveArguments(EvalArguments):
    """Options of a SimCSE or supervised run; ``None`` fields take the mode's recipe default (``RECIPES``). The
    evaluation options are :class:`~.monitor.EvalArguments`'."""

    mode: str  # "simcse", "supervised" or "scored"
    train_files: list[str]
    output_dir: str
    model: str | None = None  # base model, or an MNTP output folder (its adapter is merged)
    peft: str | None = None  # an adapter to merge into the base before training (e.g. the MNTP output)
    # supervised: on queries; scored: on both texts (a symmetric task); one per train file, or one for all
    instructions: list[str] = field(default_factory=list)
    # supervised: instructions on the positives and hard negatives too (once, or per file; "" for none), as the
    # original's E5 mix does for its symmetric tasks (NLI's similar-text split, duplicate questions)
    document_instructions: list[str] = field(default_factory=list)
    split: str | None = None  # supervised / scored: keep rows whose `split` (SICK: SemEval_set) column equals this
    max_examples: int | None = None  # per file
    batch_size: int | None = None  # per device
    max_length: int | None = None
    learning_rate: float | None = None
    scale: float | None = None  # cosine similarity multiplier (1 / temperature)
    attention_dropout: float | None = None
    warmup_steps: int | None = None
    # scored: "cosent" (default), "angle" (CoSENT on AnglE's similarity) or "cosine" (MSE of cosine and score);
    # simcse / supervised: "infonce" (the only one)
    loss: str | None = None
    # scored: the (low, high) scale of the gold scores, mapped to [0, 1]; default: known for STS-B (0, 5) and SICK
    # (1, 5), else as they are within [-1, 1] (see read_scored_training_file; only the cosine loss depends on it)
    score_range: tuple[float, float] | None = None
    mask_false_negatives: bool = False
    # simcse / supervised: also the positive → query direction (sentence-transformers'
    # MultipleNegativesSymmetricRankingLoss); the loss is the mean of both directions
    symmetric: bool = False
    num_negatives: int = 1  # supervised: hard negatives per query (the original: 1); fewer if the data has fewer
    # supervised: GISTEmbed (sentence-transformers' GISTEmbedLoss): a frozen guide encoder (a folder LLM2Vec loads)
    # whose similarities filter false negatives; the batch's other queries and positives become candidates too
    guide_model: str | None = None
    guide_margin: float = 0.0
    guide_margin_strategy: str = "absolute"  # or "relative"
    contrast_anchors: bool = True  # with guide_model: the batch's other queries are candidates
    contrast_positives: bool = True  # with guide_model: positive i against the other positives
    gradcache_chunk_size: int | None = None  # encoder chunk size for GradCache; None = plain in-batch
    gradcache_chunk_tokens: int | None = None  # GradCache chunks of at most this many tokens (instead of a size)
    pooling_mode: str = "mean"
    # Matryoshka (sentence-transformers' MatryoshkaLoss): the loss summed over these embedding prefixes, so that
    # encode(..., truncate_dim=d) keeps its quality; e.g. [2048, 1024, 512, 256, 128, 64]
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None  # one per dimension; default 1 each
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    fused_lora: bool = True  # llm2vec_fast.lora.fuse_lora: same values, less memory; False = peft's own forward
    grad_accum: int = 1
    max_steps: int = 1000
    gradient_checkpointing: bool | int | float = False  # True: every layer; k: the first k; 0.5: half of them
    attn_backend: str = "auto"
    dtype: str | None = None
    seed: int = 42
    max_train_seconds: float | None = None  # stop (and save) after this much wall clock, even before max_steps
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = None
    resume_from_checkpoint: str | bool | None = None
    overwrite_output_dir: bool = False  # start afresh in an output_dir that holds an earlier run
    disable_tqdm: bool | None = None
    extra_training_args: dict = field(default_factory=dict)
    # the learning-rate schedule spans this many epochs of the data (the original scripts' num_train_epochs); training
    # stops at max_steps or at the end of those epochs, whichever comes first. None: the schedule spans max_steps
    lr_schedule_epochs: float | None = None

    def __post_init__(self):
        if self.mode not in RECIPES:
            raise ValueError(f"mode must be one of {sorted(RECIPES)}, got {self.mode!r}")
        self.loss = self.loss or LOSSES[self.mode][0]
        if self.loss not in LOSSES[self.mode]:
            raise ValueError(f"loss {self.loss!r} is not one of {self.mode}'s: {list(LOSSES[self.mode])}")
        if self.loss == "cosine" and self.scale is not None:
            raise ValueError(f"scale {self.scale} has no effect with the cosine loss (the MSE of cosine and score); "
                             "it scales cosent and angle")
        for k, v in RECIPES[self.mode].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.loss == "cosine":
            self.scale = None  # unused: recorded as such
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
                                           and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0 (the similarity multiplier, 1 / temperature), got "
                             f"{self.scale!r}")
        if self.mode == "simcse" and self.batch_size == 1:
            raise ValueError(f"batch_size {self.batch_size}: SimCSE's negatives are the other sentences of the batch, "
                             "so a batch of one has nothing to learn from; use 2 or more")
        if self.loss in ("cosent", "angle") and self.batch_size < 2:
            raise ValueError(f"batch_size {self.batch_size}: {self.loss} compares the pairs of a batch, so a batch "
                             "of one pair has no loss; use 2 or more")
        if self.mode != "scored" and self.score_range is not None:
            raise ValueError(f"score_range {self.score_range} applies to scored pairs (mode 'scored'), not to "
                             f"{self.mode}")
        if self.score_range is not None:
            r = tuple(self.score_range)
            if len(r) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                                      for x in r) or not r[0] < r[1]:
                raise ValueError(f"score_range must be (low, high), finite numbers with low < high, got "
                                 f"{self.score_range!r}")
            self.score_range = (float(r[0]), float(r[1]))
        if self.mode != "supervised" and self.document_instructions:
            raise ValueError(f"document_instructions are for supervised training, not {self.mode}")
        if self.mode == "simcse" and self.split is not None:
            raise ValueError(f"split {self.split!r} filters rows by a split column; it does not apply to simcse")
        if self.mode == "scored" and self.symmetric:
            raise ValueError("symmetric adds the positive -> query direction of in-batch negatives (simcse, "
                             "supervised); scored pairs have no such direction")
        if self.mode == "scored" and self.mask_false_negatives:
            raise ValueError("mask_false_negatives applies to in-batch negatives (simcse, supervised), not to scored "
                             "pairs")
        if self.guide_model is not None:
            if self.mode != "supervised":
                raise ValueError(f"guide_model (GISTEmbed) filters the negatives of query / positive pairs: mode "
                                 f"'supervised', not {self.mode!r}")
            if self.mask_false_negatives or self.symmetric:
                raise ValueError("guide_model filters false negatives itself: not with mask_false_negatives or "
                                 "symmetric")
            if self.guide_margin_strategy not in ("absolute", "relative"):
                raise ValueError(f"guide_margin_strategy must be 'absolute' or 'relative', got "
                                 f"{self.guide_margin_strategy!r}")
            if not (isinstance(self.guide_margin, (int, float)) and math.isfinite(self.guide_margin)):
                raise ValueError(f"guide_margin must be a finite number, got {self.guide_margin!r}")
            if Path(self.guide_model).exists():
                self.guide_model = str(Path(self.guide_model).resolve())
        else:
            for name, default in (("guide_margin", 0.0), ("guide_margin_strategy", "absolute"),
                                  ("contrast_anchors", True), ("contrast_positives", True)):
                if getattr(self, name) != default:
                    raise ValueError(f"{name} given without guide_model: it would have no effect")
        if not isinstance(self.num_negatives, int) or self.num_negatives < 0:
            raise ValueError(f"num_negatives must be an int >= 0, got {self.num_negatives!r}")
        for name in ("gradcache_chunk_size", "gradcache_chunk_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        if self.gradcache_chunk_size and self.gradcache_chunk_tokens:
            raise ValueError("give gradcache_chunk_size (texts per chunk) or gradcache_chunk_tokens (tokens per "
                             f"chunk), not both: got {self.gradcache_chunk_size} and {self.gradcache_chunk_tokens}")
        as_lists(self)
        if self.mode == "scored" and self.eval_sts and self.eval_sts_instruction is None \
                and len(self.instructions) == 1:
            # score STS as the pairs are trained: the training instruction, in the form training gives it
            self.eval_sts_instruction = with_instruction("", self.instructions[0])[0]
        check_run_arguments(self)
        check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)
        self.check_eval_arguments()


class ContrastiveModel(nn.Module):
    """What the Trainer trains: an LLM2Vec encoder whose ``.model`` is a PeftModel."""

    accepts_loss_kwargs = False

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features: dict) -> torch.Tensor:
        return self.encoder(features)


class TextCollator:
    """Batches of raw texts: ``{"texts": [...], "sizes": (n_query, n_positive, n_negative)}``; the trainer
    tokenizes (per GradCache chunk when chunking). SimCSE examples are sentences (query = positive = the sentence);
    supervised examples are dicts or ``(dataset, dict)`` pairs; instructions go on queries only. ``negatives`` hard
    negatives per query are taken (a number, or one per dataset name; see :func:`negatives_per_query`). Scored
    examples (``{"text1", "text2", "score"}``) give the first texts, then the second ones, the instruction on both,
    and ``"scores"``, a float32 tensor."""

    def __init__(self, mode: str, instructions: dict | None = None, negatives: int | dict = 1,
                 document_instructions: dict | None = None):
        self.mode = mode
        self.instructions = instructions or {}
        self.document_instructions = document_instructions or {}
        self.negatives = negatives
        self.score_scales = None  # scored: each file's (low, high) mapped to 0-1, or None (as they are)

    def __call__(self, examples: list) -> dict:
        if self.mode == "simcse":
            texts = list(examples)
            return {"texts": texts + texts, "sizes": (len(texts), len(texts), 0)}
        if self.mode == "scored":
            a, b, y = [], [], []
            for ex in examples:
                name, ex = ex if isinstance(ex, tuple) else (None, ex)
                instruction = self.instructions.get(name, self.instructions.get(None))
                a.append(with_instruction(ex["text1"], instruction))
                b.append(with_instruction(ex["text2"], instruction))
                y.append(ex["score"])
            return {"texts": a + b, "sizes": (len(a), len(b), 0), "scores": torch.tensor(y, dtype=torch.float32)}
        q, p, n = [], [], []
        for ex in examples:
            name, ex = ex if isinstance(ex, tuple) else (None, ex)
            q.append(with_instruction(ex["query"], self.instructions.get(name, self.instructions.get(None))))
            doc = self.document_instructions.get(name, self.document_instructions.get(None))
            p.append(with_instruction(ex["positive"], doc))
            k = self.negatives.get(name, 0) if isinstance(self.negatives, dict) else self.negatives
            negs = _negatives_of(ex)
            if len(negs) < k:
                raise ValueError(f"an example has {len(negs)} hard negatives, the batch needs {k}: "
                                 f"{ex['query'][:60]!r}")
            n.extend(with_instruction(x, doc) for x in negs[:k])
        return {"texts": q + p + n, "sizes": (len(q), len(p), len(n))}


def _negatives_of(ex: dict) -> list[str]:
    if "negatives" in ex:
        return ex["negatives"]
    return [ex["negative"]] if ex.get("negative") is not None else []


def negatives_per_query(examples: list[dict], wanted: int, name: str = "") -> int:
    """Hard negatives per query for one dataset: ``wanted``, or fewer when some example has fewer (every batch then
    has the same number per query, which cross-device gathering needs). A shortfall is logged, never silent."""
    counts = [len(_negatives_of(ex)) for ex in examples]
    have = min(counts, default=0)
    k = min(wanted, have)
    if k < wanted:
        short = sum(c < wanted for c in counts)
        logger.warning("%s: %d of %d examples have fewer than %d hard negatives (fewest: %d); training with %d per "
                       "query%s", name or "dataset", short, len(examples), wanted, have, k,
                       " (in-batch negatives only)" if k == 0 else "")
    return k


class ContrastiveTrainer(AdapterTrainer):
    """Trainer with the contrastive loss in ``compute_loss`` and GradCache in ``training_step``."""

    def __init__(self, *args, scale: float = 50.0, mask_false_negatives: bool = False, loss: str = "infonce",
                 symmetric: bool = False,
                 gradcache_chunk_size: int | None = None, gradcache_chunk_tokens: int | None = None,
                 matryoshka_dims: list[int] | None = None, matryoshka_weights: list[float] | None = None,
                 guide=None, guide_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.guide, self.guide_options = guide, dict(guide_options or {})
        self.peft_module = self.model.encoder.model
        self.scale = scale
        self.loss_name = loss
        self.symmetric = symmetric
        self.mask_false_negatives = mask_false_negatives
        self.matryoshka_dims, self.matryoshka_weights = matryoshka_dims, matryoshka_weights
        self.gradcache_chunk_size = gradcache_chunk_size
        self.gradcache_chunk_tokens = gradcache_chunk_tokens

    def _encode(self, model, texts):
        return model(self.model.encoder.tokenize(texts, prepared_ok=False))

    def _guide_embeddings(self, texts):
        """The frozen guide's embeddings of a batch's texts (GISTEmbed), on the training device, outside autograd."""
        with torch.no_grad():
            g = self.guide.encode(list(texts), convert_to_tensor=True, show_progress_bar=False)
        return g.clone().to(self.args.device)  # a plain tensor (encode's is an inference tensor)

    def _loss(self, reps, sizes, scores=None, guide=None):
        nq, np_, nn_ = sizes
        q, p = reps[:nq], reps[nq:nq + np_]
        if guide is not None:
            n = reps[nq + np_:nq + np_ + nn_] if nn_ else None
            gn = guide[nq + np_:nq + np_ + nn_] if nn_ else None
            return gist_loss(q, p, n, guide[:nq], guide[nq:nq + np_], gn, scale=self.scale,
                             matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights,
                             **self.guide_options)
        if self.loss_name != "infonce":
            return scored_pair_loss(q, p, scores, self.loss_name, scale=self.scale,
                                    matryoshka_dims=self.matryoshka_dims, matryoshka_weights=self.matryoshka_weights)
        n = reps[nq + np_:nq + np_ + nn_] if nn_ else None
        return hard_negative_nll_loss(q, p, n, scale=self.scale, mask_false_negatives=self.mask_false_negatives,
                                      matryoshka_dims=self.matryoshka_dims,
                                      matryoshka_weights=self.matryoshka_weights, symmetric=self.symmetric)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        guide = self._guide_embeddings(inputs["texts"]) if self.guide is not None else None
        reps = self._encode(model, inputs["texts"])
        loss = self._loss(reps, inputs["sizes"], inputs.get("scores"), guide)
        return (loss, {"embeddings": reps}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not (self.gradcache_chunk_size or self.gradcache_chunk_tokens):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        ga = self.current_gradient_accumulation_steps if hasattr(self, "current_gradient_accumulation_steps") \
            else self.args.gradient_accumulation_steps
        with self.compute_loss_context_manager():
            loss = self._grad_cache(model, inputs, ga)
        return self.watch_loss(loss / ga)

    def _grad_cache(self, model, inputs, ga):
        texts, encode, chunks = inputs["texts"], (lambda ts: self._encode(model, ts)), self.gradcache_chunk_size
        guide = self._guide_embeddings(texts) if self.guide is not None else None
        if self.gradcache_chunk_tokens:
            # tokenized once, chunked by tokens (what a chunk's activations grow with), packed per chunk
            ids, starts, _ = self.model.encoder.tokenize_items(_normalize_inputs(texts))
            chunks = token_chunk_sizes([len(x) for x in ids], self.gradcache_chunk_tokens)
            texts = list(range(len(ids)))

            def encode(rows):
                return model(pack([ids[i] for i in rows], [starts[i] for i in rows]))
        return grad_cache_step(
            encode=encode,
            loss_fn=lambda reps: self._loss(reps, inputs["sizes"], inputs.get("scores"), guide),
            items=texts, chunk_size=chunks,
            backward=lambda t: self.accelerator.backward(t / ga),
            no_sync=lambda: self.accelerator.no_sync(model),
            device=self.args.device)


def load_encoder(args: ContrastiveArguments):
    """LLM2Vec encoder with the MNTP adapter merged, attention dropout set and a fresh LoRA adapter."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.bidirectional import set_attention_dropout

    encoder = LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=True,
                                      pooling_mode=args.pooling_mode, max_length=args.max_length,
                                      attn_backend=args.attn_backend, dtype=args.dtype)
    set_attention_dropout(encoder.model, args.attention_dropout)
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's random init: the same on every rank and in every run
    encoder.model = add_lora(encoder.model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                             fused=args.fused_lora)
    if args.gradient_checkpointing:
        enable_checkpointing(encoder.model, args.gradient_checkpointing)
    return encoder


def load_guide(args: ContrastiveArguments, encoder):
    """The frozen GISTEmbed guide (``args.guide_model``, any folder ``LLM2Vec.from_pretrained`` loads, with its own
    pooling and settings) on the trained encoder's device, or None."""
    if args.guide_model is None:
        return None
    from llm2vec_fast import LLM2Vec

    guide = LLM2Vec.from_pretrained(args.guide_model, device=encoder.device, dtype=args.dtype)
    guide.model.requires_grad_(False)
    guide.model.eval()
    return guide


def build_dataset(args: ContrastiveArguments, world_size: int = 1):
    """The training dataset and collator of a run."""
    if args.mode == "simcse":
        sents = []
        for f in args.train_files:
            sents.extend(read_sentences(f, args.max_examples))
        return ListDataset(sents), TextCollator("simcse"), False
    for name, given in (("instruction", args.instructions), ("document instruction", args.document_instructions)):
        if given and len(given) not in (1, len(args.train_files)):
            raise ValueError(f"give one {name} for all files or one per file: {len(given)} {name}s for "
                             f"{len(args.train_files)} files")
    names = [Path(f).stem for f in args.train_files]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    scales = {}
    if args.mode == "scored":
        data = {}
        for n, f in zip(names, args.train_files, strict=True):
            data[n], scales[str(f)] = read_scored_training_file(f, args)
    else:
        data = {n: read_triplets(f, split=args.split, limit=args.max_examples)
                for n, f in zip(names, args.train_files, strict=True)}
    if len(args.instructions) == 1:
        instr = {None: args.instructions[0]}
    else:
        instr = dict(zip(names, args.instructions, strict=False))
    docs = ({None: args.document_instructions[0]} if len(args.document_instructions) == 1 else
            dict(zip(names, args.document_instructions, strict=False)))
    if args.mode == "scored":
        k = {n: 0 for n in names}
    else:
        k = {n: negatives_per_query(ex, args.num_negatives, f) for (n, ex), f in zip(data.items(), args.train_files,
                                                                                      strict=True)}
    if len(data) == 1:
        dataset, grouped = ListDataset(data[names[0]]), False
        collator = TextCollator(args.mode, instr, k[names[0]], docs)
    else:
        ordered = one_dataset_per_batch(data, args.batch_size * world_size, seed=args.seed)
        dataset, collator, grouped = ListDataset(ordered), TextCollator(args.mode, instr, k, docs), True
    collator.score_scales = scales or None
    return dataset, collator, grouped


def read_scored_training_file(path, args: ContrastiveArguments) -> tuple[list[dict], list[float] | None]:
    """A scored-pair file's rows and the (low, high) scale their scores were mapped from to [0, 1] (None: used as
    they are).

    The scale: ``args.score_range``, else the file's known STS-B (0–5) / SICK (1–5) scale. Other files' scores are
    used as they are when they lie in [-1, 1] (where cosines lie, as sentence-transformers takes them). Beyond that,
    the cosine loss needs ``score_range``; CoSENT and AnglE read only the order of the scores, so their scores are
    mapped from the file's own minimum and maximum (which changes no order).
    """
    rows, known = read_scored_pairs(path, limit=args.max_examples, split=args.split)
    scale, scores = args.score_range or known, [r["score"] for r in rows]
    how = "given" if args.score_range else "the file's known scale"
    if scale is None and not all(-1 <= x <= 1 for x in scores):
        if args.loss == "cosine":
            raise ValueError(f"{path}: scores span [{min(scores)}, {max(scores)}], beyond the [-1, 1] of cosines: "
                             "give score_range (--score-range=LOW,HIGH), the scale to map to 0-1, for the cosine "
                             "loss")
        scale, how = (min(scores), max(scores)), "the file's own range; the loss reads only their order"
    rows = rescale_scores(rows, scale, path)
    if scale is None:
        logger.info("%s: %d scored pairs, scores used as they are (all in [-1, 1])", path, len(rows))
    else:
        logger.info("%s: %d scored pairs, scores %s-%s mapped to 0-1 (%s)", path, len(rows), scale[0], scale[1],
                    how)
    return rows, None if scale is None else [float(scale[0]), float(scale[1])]


class _SequentialTrainer(ContrastiveTrainer):
    """Keeps the dataset's order (batches pre-grouped by source dataset)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def train_contrastive(args: ContrastiveArguments) -> dict:
    """Run SimCSE or supervised contrastive training; writes the adapter, tokenizer, ``llm2vec_config.json`` and
    ``llm2vec_training.json`` (which names the base to load it on) to ``args.output_dir``.

    Returns ``{"output_dir", "base_model", "losses", "train_runtime", "examples"}``.
    """
    # the process group may not exist yet (TrainingArguments creates it): read the launcher's environment
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prepare_output_dir(args)
    dataset, collator, grouped = build_dataset(args, world)
    if len(dataset) < args.batch_size * world:
        per = f"{args.batch_size} per process x {world} processes" if world > 1 else f"{args.batch_size}"
        why = ("the loss compares the pairs of a batch" if args.mode == "scored" else
               "the batch is each example's negatives")
        raise ValueError(f"{len(dataset)} training examples in {list(args.train_files)}, fewer than one batch of "
                         f"{per}: contrastive batches are always full ({why}); lower the batch size or give more "
                         "data")
    encoder = load_encoder(args)
    check_matryoshka(args.matryoshka_dims, args.matryoshka_weights, encoder.model.config.hidden_size)
    sched = schedule_steps(args, len(dataset), world, drop_last=True)
    targs = training_arguments(
        args.output_dir, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.learning_rate,
        max_steps=min(args.max_steps, sched or args.max_steps), warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed,
        **mixed_precision(args.dtype), disable_tqdm=args.disable_tqdm,
        drop_last=True, extra=args.extra_training_args)
    cls = _SequentialTrainer if grouped else ContrastiveTrainer
    trainer = cls(model=ContrastiveModel(encoder), args=targs, train_dataset=dataset, data_collator=collator,
                  processing_class=encoder.tokenizer, scale=args.scale, loss=args.loss, symmetric=args.symmetric,
                  mask_false_negatives=args.mask_false_negatives, gradcache_chunk_size=args.gradcache_chunk_size,
                  gradcache_chunk_tokens=args.gradcache_chunk_tokens, matryoshka_dims=args.matryoshka_dims,
                  matryoshka_weights=args.matryoshka_weights, guide=load_guide(args, encoder),
                  guide_options=dict(margin=args.guide_margin, margin_strategy=args.guide_margin_strategy,
                                     contrast_anchors=args.contrast_anchors,
                                     contrast_positives=args.contrast_positives))
    trainer.run_identity = run_identity(args)
    trainer.schedule_steps = sched
    counter, limit = add_step_callbacks(trainer, args.max_train_seconds)
    monitor = _monitor(trainer, encoder, args)
    with cpu_work(trainer.args.device):  # CPU: activations reuse freed heap memory (cpu_memory)
        out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    losses = loss_history(trainer)
    evals = monitor.summary() if monitor else {}
    if limit and limit.stopped_at is not None:
        evals["stopped_by_time_at"] = limit.stopped_at  # recorded with the output: the run ended before max_steps
    if trainer.args.should_save:
        evals["loaded_best"] = bool(monitor and args.load_best_at_end and load_best(trainer, monitor))
        save_contrastive_output(encoder, args, losses, evals, score_scales=collator.score_scales)
    return {"output_dir": args.output_dir, "base_model": args.model, "losses": losses,
            "train_runtime": out.metrics.get("train_runtime"), "global_step": out.global_step,
            "train_loss": out.training_loss, "steps_run": counter.steps, "examples": len(dataset),
            "stopped_at": limit and limit.stopped_at, **evals}


def _monitor(trainer, encoder, args: ContrastiveArguments):
    """The evaluation callback of a run that asks for one (None otherwise): the encoder being trained, in eval mode
    (no attention dropout) and with the output's ``max_length``, scores the evaluation data."""
    if not args.evaluates():
        return None

    def scorer(fn):
        def run():
            kept, encoder.max_length = encoder.max_length, max(512, args.max_length)
            try:
                return fn(encoder)
            finally:
                encoder.max_length = kept
        return run

    scorers = [scorer(fn) for fn in encoder_evaluators(args, encoder.model.config.hidden_size)]

    def save(folder, extra):
        save_contrastive_output(encoder, args, loss_history(trainer), extra, folder=folder,
                                score_scales=getattr(trainer.data_collator, "score_scales", None))

    return add_eval_callback(trainer, args, scorers, save, encoder)


def save_contrastive_output(encoder, args: ContrastiveArguments, losses: list[dict],
                            evaluations: dict | None = None, folder: str | os.PathLike | None = None,
                            score_scales: dict | None = None) -> None:
    """Adapter, tokenizer, ``llm2vec_config.json`` and the training record, into ``folder`` (default
    ``args.output_dir``). ``score_scales`` (scored pairs): each training file's (low, high) mapped to [0, 1], or
    None where its scores were used as they are."""
    out = Path(folder or args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    # the encoder keeps its default 512 tokens (or the training length when longer), not SimCSE's 128
    write_encoder_config(out, {"pooling_mode": args.pooling_mode, "max_length": max(512, args.max_length),
                                 "doc_max_length": encoder.doc_max_length, "skip_instruction": True,
                                 "bidirectional": True})
    from llm2vec_fast import resolve_model

    base = resolve_model(args.model)  # the default model's local folder, not None
    base_hint = base if args.peft is None else f"{base} with {args.peft} merged"
    write_json(out / TRAINING_NAME, {
        "stage": args.mode, "load_with": {"base_model_name_or_path": base, "merged_adapter": args.peft},
        "note": f"load with LLM2Vec.from_pretrained(base, peft_model_name_or_path=this folder), base = {base_hint}",
        "arguments": dataclasses.asdict(args), "losses": losses,
        **({"score_scales": score_scales} if score_scales else {}), **(evaluations or {})})
