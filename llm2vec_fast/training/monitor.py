"""Evaluation during training: scores every ``eval_steps`` optimizer steps, the best adapter kept on disk, optional
early stopping and a final output that is the best model rather than the last.

What is scored (any mix; each run needs at least one when an evaluation option is set):

* ``eval_sts``: an STS-B TSV or SICK file; Spearman of cosine similarity (``eval_sts_spearman``) through the
  encoder being trained (pooling, instructions and packing as in ``LLM2Vec.encode``);
* ``eval_retrieval``: a BEIR folder; nDCG@10 (``eval_retrieval_ndcg_at_10``);
* ``eval_reranking``: a reranking file (queries with relevant and irrelevant candidates, see
  ``evaluation.load_reranking``; SNLI's triplet file with ``eval_reranking_split``); MAP (``eval_reranking_map``);
* MNTP only: held-out blocks (``validation_files`` or ``validation_split_percentage``), masked once with a fixed seed
  so that every evaluation scores the same masks: ``eval_loss``, ``eval_accuracy`` (top-1 over masked tokens) and
  ``eval_perplexity``;
* Python API: ``evaluators``, callables ``fn(encoder) -> {name: number}`` (names get an ``eval_`` prefix).

The metric that picks the best step (``best_metric``) defaults to the first of ``eval_loss`` (lower is better),
``eval_sts_spearman``, ``eval_retrieval_ndcg_at_10``, ``eval_reranking_map`` and the first custom metric. The best
step's output is written to ``<output_dir>/best/``, a folder that loads as the final output does, and replaced when
a later evaluation beats it. Scores go into the Trainer's log (the progress bar, ``trainer_state.json`` and any
``report_to`` integration), the result's ``evaluations`` and ``llm2vec_training.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from .._io import check_count

logger = logging.getLogger(__name__)

BEST_DIR = "best"
# the standard metrics, in the order that picks the default best_metric
STS_METRIC = "eval_sts_spearman"
RETRIEVAL_METRIC = "eval_retrieval_ndcg_at_10"
RERANKING_METRIC = "eval_reranking_map"
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass(kw_only=True)
class EvalArguments:
    """Evaluation-during-training options, shared by every training stage (see the module docstring)."""

    eval_sts: str | None = None  # STS-B TSV / SICK file: Spearman of cosine similarity
    eval_sts_limit: int | None = None  # first N pairs only
    eval_sts_instruction: str | None = None  # on both texts (scored-pair training with one instruction: its own)
    eval_retrieval: str | None = None  # BEIR folder: nDCG@10
    eval_retrieval_instruction: str | None = None  # query instruction; None: evaluation's default web-search one
    eval_retrieval_max_docs: int | None = None
    eval_retrieval_max_queries: int | None = None
    eval_reranking: str | None = None  # reranking file (query, positives, negatives): MAP
    eval_reranking_split: str | None = None  # rows whose split column equals this (SNLI triplets: dev)
    eval_reranking_limit: int | None = None  # first N scored queries only
    eval_reranking_instruction: str | None = None  # on queries only
    eval_steps: int | None = None  # None: save_steps (or a tenth of max_steps when save_steps is 0)
    eval_on_start: bool = False  # also score the model before the first step
    eval_batch_tokens: int | None = None  # token budget of the encoder's batches (None: its default)
    eval_truncate_dim: int | None = None  # score the embeddings' first D dimensions (Matryoshka training)
    best_metric: str | None = None  # None: see the module docstring
    greater_is_better: bool | None = None  # None: lower is better for names ending in "loss" / "perplexity"
    load_best_at_end: bool = False  # the final output is the best evaluation's model, not the last step's
    early_stopping_patience: int | None = None  # stop after this many evaluations without a better best_metric
    evaluators: list[Callable] = field(default_factory=list)  # Python API: fn(encoder) -> {name: number}

    def check_eval_arguments(self) -> None:
        for name in ("eval_sts_limit", "eval_retrieval_max_docs", "eval_retrieval_max_queries", "eval_reranking_limit",
                     "eval_steps", "eval_batch_tokens", "eval_truncate_dim", "early_stopping_patience"):
            check_count(name, getattr(self, name), optional=True)
        if self.eval_sts_limit is not None and self.eval_sts_limit < 2:
            raise ValueError(f"eval_sts_limit must be >= 2 (a correlation needs two pairs), got {self.eval_sts_limit}")
        for name, needs in (("eval_sts_limit", "eval_sts"), ("eval_sts_instruction", "eval_sts"),
                            ("eval_retrieval_instruction", "eval_retrieval"),
                            ("eval_retrieval_max_docs", "eval_retrieval"),
                            ("eval_retrieval_max_queries", "eval_retrieval"),
                            ("eval_reranking_split", "eval_reranking"), ("eval_reranking_limit", "eval_reranking"),
                            ("eval_reranking_instruction", "eval_reranking")):
            if getattr(self, name) is not None and not getattr(self, needs):
                raise ValueError(f"{name} given without {needs}: it would have no effect")
        if self.eval_sts is not None and not Path(self.eval_sts).is_file():
            raise FileNotFoundError(f"eval_sts: STS data file {self.eval_sts!r} not found")
        if self.eval_retrieval is not None and not Path(self.eval_retrieval).is_dir():
            raise FileNotFoundError(f"eval_retrieval: BEIR folder {self.eval_retrieval!r} not found")
        if self.eval_reranking is not None and not Path(self.eval_reranking).is_file():
            raise FileNotFoundError(f"eval_reranking: reranking data file {self.eval_reranking!r} not found")
        for fn in self.evaluators:
            if not callable(fn):
                raise TypeError(f"evaluators must be callables fn(encoder) -> dict, got {fn!r}")
        wanted = [n for n in ("eval_steps", "eval_on_start", "best_metric", "load_best_at_end",
                              "early_stopping_patience", "eval_truncate_dim") if getattr(self, n)]
        if self.greater_is_better is not None:
            wanted.append("greater_is_better")
        if wanted and not self.evaluates():
            raise ValueError(f"{', '.join(wanted)} given, but nothing to evaluate: set eval_sts, eval_retrieval, "
                             f"eval_reranking"
                             f"{', validation data' if hasattr(self, 'validation_files') else ''} or evaluators")
        if self.best_metric is not None:
            if not self.best_metric.startswith("eval_"):
                self.best_metric = f"eval_{self.best_metric}"
            known = self.known_metrics()
            if not self.evaluators and self.best_metric not in known:
                raise ValueError(f"best_metric {self.best_metric!r} is not among this run's metrics {sorted(known)}")

    def known_metrics(self) -> set[str]:
        """The metric names this run's evaluation options give (custom evaluators' names are known only once
        they ran)."""
        return ({STS_METRIC} if self.eval_sts else set()) | ({RETRIEVAL_METRIC} if self.eval_retrieval else set()) \
            | ({RERANKING_METRIC} if self.eval_reranking else set())

    def evaluates(self) -> bool:
        return bool(self.eval_sts or self.eval_retrieval or self.eval_reranking or self.evaluators)

    def eval_every(self) -> int:
        return self.eval_steps or getattr(self, "save_steps", 0) or max(1, getattr(self, "max_steps", 1000) // 10)


def metric_prefers_lower(name: str) -> bool:
    return name.endswith(LOWER_IS_BETTER)


def encoder_evaluators(args: EvalArguments, width: int | None = None) -> list[Callable]:
    """The scorers of ``args`` that embed texts: each ``fn(encoder) -> {metric: value}``. ``width``: the
    embeddings' width, that ``eval_truncate_dim`` must not exceed (checked here, before training)."""
    if width is not None and args.eval_truncate_dim is not None and args.eval_truncate_dim > width:
        raise ValueError(f"eval_truncate_dim {args.eval_truncate_dim} is more than the embedding width {width}")
    from llm2vec_fast.evaluation import (
        DEFAULT_RETRIEVAL_INSTRUCTION,
        evaluate_reranking,
        evaluate_retrieval,
        evaluate_sts,
        load_beir,
        load_reranking,
        load_sts,
    )

    # read once here, so that a malformed file fails before training, not at the first evaluation
    if args.eval_sts:
        gold = load_sts(args.eval_sts)[2][:args.eval_sts_limit]
        if len(gold) < 2:
            raise ValueError(f"eval_sts: {args.eval_sts} has {len(gold)} sentence pair(s); a correlation needs two")
    if args.eval_retrieval:
        load_beir(args.eval_retrieval)
    if args.eval_reranking:
        samples = load_reranking(args.eval_reranking, args.eval_reranking_split)
        if not any(s["positive"] and s["negative"] for s in samples):
            raise ValueError(f"eval_reranking: no query of {args.eval_reranking} has both a relevant and an "
                             "irrelevant text")
    out = []
    if args.eval_sts:
        def sts(encoder):
            r = evaluate_sts(encoder, args.eval_sts, limit=args.eval_sts_limit, instruction=args.eval_sts_instruction,
                             max_batch_tokens=args.eval_batch_tokens, truncate_dim=args.eval_truncate_dim)
            return {STS_METRIC: _main_score(r)}
        out.append(sts)
    if args.eval_retrieval:
        instruction = args.eval_retrieval_instruction
        if instruction is None:
            instruction = DEFAULT_RETRIEVAL_INSTRUCTION

        def retrieval(encoder):
            r = evaluate_retrieval(encoder, args.eval_retrieval, instruction=instruction,
                                   max_docs=args.eval_retrieval_max_docs, max_queries=args.eval_retrieval_max_queries,
                                   max_batch_tokens=args.eval_batch_tokens, truncate_dim=args.eval_truncate_dim)
            return {RETRIEVAL_METRIC: _main_score(r)}
        out.append(retrieval)
    if args.eval_reranking:
        def reranking(encoder):
            r = evaluate_reranking(encoder, args.eval_reranking, split=args.eval_reranking_split,
                                   instruction=args.eval_reranking_instruction, limit=args.eval_reranking_limit,
                                   max_batch_tokens=args.eval_batch_tokens, truncate_dim=args.eval_truncate_dim)
            return {RERANKING_METRIC: _main_score(r)}
        out.append(reranking)
    for fn in args.evaluators:
        out.append(_prefixed(fn))
    return out


def _main_score(result: dict) -> float:
    (split,) = result["scores"].values()
    return float(split[0]["main_score"])


def _prefixed(fn):
    def run(encoder):
        got = fn(encoder)
        if not isinstance(got, dict) or not got:
            raise TypeError(f"evaluator {getattr(fn, '__name__', fn)!r} returned {got!r}; expected a non-empty dict "
                            "{metric name: number}")
        out = {}
        for k, v in got.items():
            try:
                out[k if str(k).startswith("eval_") else f"eval_{k}"] = float(v)
            except (TypeError, ValueError):
                raise TypeError(f"evaluator {getattr(fn, '__name__', fn)!r}: metric {k!r} is {v!r}, not a "
                                "number") from None
        return out
    return run


class EvalCallback(TrainerCallback):
    """Scores the model every ``every`` optimizer steps, at the last step and (``on_start``) before the first; logs
    the scores, keeps the best step's output in ``<output_dir>/best`` and stops early after ``patience`` evaluations
    without a better ``metric``.

    ``scorers``: callables ``fn() -> {metric: value}`` run in eval mode without gradients (the model's train mode is
    restored after). ``save(folder, extra)`` writes a complete output into ``folder``; ``extra`` goes into its
    training record. Under torchrun, process 0 scores and saves and sends the scores to the others, so every
    process takes the same stop decision.
    """

    def __init__(self, trainer, scorers: list[Callable[[], dict]], save: Callable, *, every: int,
                 metric: str | None = None, on_start: bool = False, patience: int | None = None,
                 model: torch.nn.Module | None = None, greater_is_better: bool | None = None):
        if not scorers:
            raise ValueError("nothing to evaluate: no evaluation data or evaluator was given")
        self.trainer, self.scorers, self.save = trainer, scorers, save
        self.every, self.metric, self.on_start, self.patience = every, metric, on_start, patience
        self.greater_is_better = greater_is_better
        self.model = model if model is not None else trainer.model
        self.evaluations: list[dict] = []
        self.best: dict | None = None  # {"step", "metric", "value", "path"}
        self.since_best = 0
        self.stopped_early_at = None

    # ------------------------------------------------------------------ folders
    @property
    def best_dir(self) -> Path:
        return (Path(self.trainer.args.output_dir) / BEST_DIR).resolve()

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            self._restore(state)
        elif self.best_dir.exists():
            self._set_aside("it was left by an earlier run into this output folder")
        if self.on_start and state.global_step == 0:
            self._evaluate(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        last = state.global_step >= state.max_steps or control.should_training_stop
        if state.global_step % self.every == 0 or last:
            self._evaluate(state, control)

    # ------------------------------------------------------------------ scoring
    def _evaluate(self, state, control):
        step = state.global_step
        if self.evaluations and self.evaluations[-1]["step"] == step:
            return
        from .common import FiniteLossGuard

        for guard in self.trainer.callback_handler.callbacks:
            if isinstance(guard, FiniteLossGuard):  # NaN weights: its error, not the encoder's
                guard.check(state, "before the step's evaluation")
        args = self.trainer.args
        metrics = self._score() if args.process_index == 0 else None
        metrics = _broadcast(metrics)
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            logger.warning("step %d: %s not finite (e.g. constant gold scores or embeddings); recorded as null",
                           step, ", ".join(bad))
        # the record holds null for a NaN (valid JSON); the Trainer's log gets the value as it is
        self.evaluations.append({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}})
        # the Trainer's on_log clears should_log: the step's own loss log must still happen
        keep = control.should_log
        self.trainer.log(dict(metrics))
        control.should_log = keep
        if self.metric is None:
            self.metric = default_metric(metrics)
        if self.metric not in metrics:
            raise ValueError(f"best_metric {self.metric!r} is not among the evaluation's metrics {sorted(metrics)}")
        value = metrics[self.metric]
        if self._better(value):
            self._set_best({"step": step, "metric": self.metric, "value": value})
            if args.should_save:
                self._save_best()
            logger.info("step %d: %s = %.4f, the best so far", step, self.metric, value)
        else:
            self.since_best += 1
            if self.patience and self.since_best >= self.patience and step < state.max_steps:
                logger.warning("early stopping at step %d: %s has not improved on %.4f (step %d) in %d evaluations",
                               step, self.metric, self.best["value"] if self.best else float("nan"),
                               self.best["step"] if self.best else -1, self.since_best)
                self.stopped_early_at = step
                control.should_training_stop = True

    def _lower_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return not self.greater_is_better
        return metric_prefers_lower(self.metric)

    def _better(self, value, than: float | None = None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if than is None:
            if self.best is None:
                return True
            than = self.best["value"]
        return value < than if self._lower_is_better() else value > than

    def _set_best(self, best: dict) -> None:
        """Record ``best`` (kept in ``best/``). The Trainer's own best fields stay unset: transformers keeps the
        checkpoint they name out of ``save_total_limit``'s rotation and, at a limit of 1, deletes every other one
        at the end, the last step's included."""
        self.best = {**best, "path": str(self.best_dir)}
        self.since_best = sum(1 for r in self.evaluations if r["step"] > best["step"])

    def _score(self) -> dict:
        model = self.model
        was_training = model.training
        model.eval()
        dev = self.trainer.args.device
        devices = [dev] if dev.type == "cuda" else []
        try:
            # scoring draws no random numbers, but a scorer's own code might: the run's streams stay as they were
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self._autocast():
                metrics = {}
                for fn in self.scorers:
                    metrics.update(fn())
        finally:
            model.train(was_training)
        return metrics

    def _autocast(self):
        acc = getattr(self.trainer, "accelerator", None)
        return acc.autocast() if acc is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ the best folder
    def _save_best(self):
        out = self.best_dir
        tmp = out.with_name(f".{BEST_DIR}.tmp")
        old = out.with_name(f".{BEST_DIR}.old")
        for d in (tmp, old):
            if d.exists():
                shutil.rmtree(d)
        self.save(tmp, {"best": self.best, "evaluations": self.evaluations})
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)

    def _restore(self, state):
        """A resumed run: the evaluations the checkpoint's log holds (steps up to the checkpoint's), and their best.

        ``best/`` is kept when it holds that best. Otherwise (it comes from a step after the checkpoint, of a run that
        went on past it; or it was picked by another metric) it is renamed aside, never deleted, and ``best/`` is
        rebuilt from the checkpoint of the best scored step, when that checkpoint is still there."""
        self.evaluations = [{k: (v if k == "step" or _finite(v) else None) for k, v in r.items()
                             if k == "step" or k.startswith("eval_")}
                            for r in state.log_history if any(k.startswith("eval_") for k in r)]
        # process 0 decides (and moves folders); the others take its decision, so that all stop at the same step
        if self.trainer.args.process_index == 0:
            self._restore_best(state.global_step)
        self.metric, self.best, self.since_best = _broadcast((self.metric, self.best, self.since_best))

    def _restore_best(self, s: int) -> None:
        record = _read_best(self.best_dir)
        if self.metric is None:
            self.metric = record["metric"] if record else (default_metric(self.evaluations[0]) if self.evaluations
                                                           else None)
        history = None
        for r in self.evaluations:
            if self.metric in r and self._better(r[self.metric], None if history is None else history["value"]):
                history = {"step": r["step"], "metric": self.metric, "value": r[self.metric]}
        if record is not None and record.get("metric") == self.metric and history is not None and \
                record["step"] == history["step"]:
            self._set_best(history)
            return
        if self.best_dir.exists():
            if record and record["step"] > s:
                why = f"it holds step {record['step']}, after the checkpoint resumed from (step {s})"
            elif record and record.get("metric") != self.metric:
                why = f"it was picked by {record['metric']}, this run picks by {self.metric}"
            else:
                why = "it is not the best of the evaluations up to the checkpoint"
            self._set_aside(why)
        if history is None:
            return
        ckpt = Path(self.trainer.args.output_dir) / f"checkpoint-{history['step']}"
        if not (ckpt / "adapter_model.safetensors").is_file():
            logger.warning("the best evaluation before the resumed checkpoint (step %d, %s = %.4f) has no checkpoint "
                           "left to rebuild %s from: the best is tracked from the evaluations to come",
                           history["step"], self.metric, history["value"], self.best_dir)
            return
        self._set_best(history)
        if self.trainer.args.should_save:
            self._rebuild_best(ckpt)

    def _set_aside(self, why: str) -> None:
        """Rename ``best/`` to the first free ``best.set-aside-N`` (process 0; never deleted)."""
        if not self.trainer.args.should_save:
            return
        from .common import set_aside

        aside = set_aside(self.best_dir)
        logger.warning("moved %s to %s: %s", self.best_dir, aside, why)

    def _rebuild_best(self, checkpoint: Path) -> None:
        """Write ``best/`` from ``checkpoint``'s adapter: loaded into the model for the save, then the resumed
        weights are put back (the same tensors, so the optimizer's state still applies)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        module = self.trainer.peft_module
        kept = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
        self.trainer._load_from_checkpoint(str(checkpoint))
        try:
            self._save_best()
        finally:
            set_peft_model_state_dict(module, kept)
        logger.warning("rebuilt %s from %s (%s = %.4f)", self.best_dir, checkpoint, self.metric, self.best["value"])

    def summary(self) -> dict:
        return {"evaluations": self.evaluations, "best": self.best, "stopped_early_at": self.stopped_early_at}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def default_metric(metrics: dict) -> str:
    for name in ("eval_loss", STS_METRIC, RETRIEVAL_METRIC, RERANKING_METRIC):
        if name in metrics:
            return name
    return next(iter(metrics))


def _read_best(folder: Path) -> dict | None:
    from .common import TRAINING_NAME

    try:
        record = json.loads((folder / TRAINING_NAME).read_text())["best"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) and "step" in record else None


def _broadcast(metrics):
    """Process 0's metrics on every process (identity outside torchrun)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return metrics
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def load_best(trainer, callback: EvalCallback) -> bool:
    """Load the best evaluation's adapter into the trained model (for ``load_best_at_end``); False when the last
    step is the best one (or nothing was evaluated)."""
    best = callback.best
    if best is None or best["step"] == trainer.state.global_step:
        return False
    trainer._load_from_checkpoint(str(callback.best_dir))
    logger.info("loaded the best evaluation's adapter (step %d, %s = %.4f) for the final output", best["step"],
                best["metric"], best["value"])
    return True


def add_eval_callback(trainer, args: EvalArguments, scorers: list[Callable[[], dict]], save: Callable,
                      model: torch.nn.Module) -> EvalCallback:
    """An :class:`EvalCallback` with ``args``' settings, added to ``trainer`` before a
    :class:`~.common.FiniteLossGuard` (which must see every stop decision)."""
    from .common import FiniteLossGuard

    callback = EvalCallback(trainer, scorers, save, every=args.eval_every(), metric=args.best_metric,
                            on_start=args.eval_on_start, patience=args.early_stopping_patience,
                            greater_is_better=args.greater_is_better, model=model)
    handler = trainer.callback_handler
    guards = [c for c in handler.callbacks if isinstance(c, FiniteLossGuard)]
    for g in guards:
        handler.remove_callback(g)
    trainer.add_callback(callback)
    for g in guards:
        trainer.add_callback(g)
    return callback
