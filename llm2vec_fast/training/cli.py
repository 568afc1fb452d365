"""``llm2vec-fast train {mntp,simcse,supervised,scored}``: argparse subcommands (the main CLI calls
:func:`add_subcommands`). Multi-GPU: launch the same command through ``torchrun --nproc-per-node N -m
llm2vec_fast.training.cli train ...`` or ``accelerate launch``; the Trainer picks the distributed set-up up."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys

from .common import LORA_TARGETS


def _common(p: argparse.ArgumentParser, steps=1000) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default=None,
                   help="base model: a local HF folder, a hub id, or smollm2-135m (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    g.add_argument("--output-dir", required=True, help="where the adapter, tokenizer and llm2vec_config.json go "
                                                        "(checkpoints in checkpoint-N subfolders)")
    g.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton", "flash_attn"],
                   help="bidirectional attention backend (auto: Triton on CUDA, PyTorch elsewhere)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16 with autocast on CUDA, float32 on CPU)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated module names")
    g.add_argument("--no-fused-lora", action="store_true",
                   help="run peft's own LoRA forward (default: llm2vec_fast.lora's, same values, less memory)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=steps)
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--lr-schedule-epochs", type=float, default=None, metavar="N",
                   help="the learning-rate schedule (warm-up, then linear decay) spans N epochs of the training data, "
                        "as the original scripts' num_train_epochs does; training still stops at --max-steps (or at "
                        "the end of those epochs, if sooner). Default: the schedule spans --max-steps")
    g.add_argument("--training-arg", action="append", default=None, metavar="KEY=VALUE", type=_training_arg,
                   help="any other transformers TrainingArguments field (e.g. weight_decay=0.01, "
                        "lr_scheduler_type=cosine, max_grad_norm=0.5); VALUE is read as JSON when it parses, else as a "
                        "string (repeatable)")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const=False,
                   default=False, help="no gradient checkpointing (the default; overrides a --config file's)")
    g.add_argument("--gradient-checkpointing", nargs="?", const=True, default=False, type=_ckpt, metavar="LAYERS",
                   help="recompute activations in the backward: in every decoder layer, or in the first LAYERS "
                        "(a count, or a fraction such as 0.5): less memory than none, less recompute than all")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max-train-seconds", type=float, default=None,
                   help="stop after this many seconds of training (the output is saved as at max-steps)")
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (0: none)")
    g.add_argument("--save-total-limit", type=int, default=None, help="keep only the last N checkpoints")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="resume from CHECKPOINT, or from the last complete checkpoint in --output-dir when no path "
                        "is given (the checkpoint must come from the same stage and model)")
    g.add_argument("--no-overwrite-output-dir", dest="overwrite_output_dir", action="store_false", default=False,
                   help="refuse an --output-dir holding an earlier run (the default; overrides a --config file's "
                        "overwrite_output_dir)")
    g.add_argument("--overwrite-output-dir", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run (its checkpoints are removed); "
                        "without it, or --resume, such a folder is refused")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("evaluation during training", "scores logged every --eval-steps and at the end; the "
                             "best step's output is kept in OUTPUT_DIR/best")
    g.add_argument("--eval-sts", default=None, metavar="FILE",
                   help="STS-B TSV or SICK file: Spearman of cosine similarity (eval_sts_spearman)")
    g.add_argument("--eval-sts-limit", type=int, default=None, metavar="N", help="score the first N pairs only")
    g.add_argument("--eval-sts-instruction", default=None,
                   help="instruction on both texts of --eval-sts (train scored with one --instruction: that one)")
    g.add_argument("--eval-retrieval", default=None, metavar="DIR", help="BEIR folder: nDCG@10 "
                   "(eval_retrieval_ndcg_at_10)")
    g.add_argument("--eval-retrieval-instruction", default=None,
                   help="query instruction for --eval-retrieval (default: the web-search one; '' for none)")
    g.add_argument("--eval-retrieval-max-docs", type=int, default=None, metavar="N")
    g.add_argument("--eval-retrieval-max-queries", type=int, default=None, metavar="N")
    g.add_argument("--eval-reranking", default=None, metavar="FILE",
                   help="reranking file: queries with relevant and irrelevant candidates, a row per query or per "
                        "triplet (e.g. SNLI's triplet file): MAP (eval_reranking_map)")
    g.add_argument("--eval-reranking-split", default=None, metavar="SPLIT",
                   help="rows of --eval-reranking whose split column equals SPLIT (SNLI triplets: dev)")
    g.add_argument("--eval-reranking-limit", type=int, default=None, metavar="N", help="score the first N queries")
    g.add_argument("--eval-reranking-instruction", default=None, help="instruction on --eval-reranking's queries")
    g.add_argument("--eval-truncate-dim", type=int, default=None, metavar="D",
                   help="score the first D dimensions of each embedding (e.g. the smallest --matryoshka-dims)")
    g.add_argument("--eval-steps", type=int, default=None,
                   help="evaluate every N optimizer steps (default: --save-steps, or a tenth of --max-steps when "
                        "--save-steps is 0)")
    g.add_argument("--eval-on-start", action="store_true", help="also evaluate before the first step")
    g.add_argument("--best-metric", default=None,
                   help="metric that picks the best step (default: eval_loss for MNTP with validation data, else "
                        "eval_sts_spearman, else eval_retrieval_ndcg_at_10, else eval_reranking_map); lower is "
                        "better for *loss/*perplexity")
    direction = g.add_mutually_exclusive_group()
    direction.add_argument("--greater-is-better", dest="greater_is_better", action="store_const", const=True,
                           default=None, help="a higher --best-metric is better (default: by name, see above)")
    direction.add_argument("--lower-is-better", dest="greater_is_better", action="store_const", const=False,
                           help="a lower --best-metric is better")
    g.add_argument("--load-best-at-end", action="store_true",
                   help="the final output is the best evaluation's model, not the last step's")
    g.add_argument("--early-stopping-patience", type=int, default=None, metavar="N",
                   help="stop after N evaluations without a better --best-metric")


def _eval_kwargs(a) -> dict:
    return dict(eval_sts=a.eval_sts, eval_sts_limit=a.eval_sts_limit, eval_sts_instruction=a.eval_sts_instruction,
                eval_retrieval=a.eval_retrieval,
                eval_retrieval_instruction=a.eval_retrieval_instruction,
                eval_retrieval_max_docs=a.eval_retrieval_max_docs,
                eval_retrieval_max_queries=a.eval_retrieval_max_queries, eval_reranking=a.eval_reranking,
                eval_reranking_split=a.eval_reranking_split, eval_reranking_limit=a.eval_reranking_limit,
                eval_reranking_instruction=a.eval_reranking_instruction, eval_steps=a.eval_steps,
                eval_truncate_dim=a.eval_truncate_dim,
                eval_on_start=a.eval_on_start, best_metric=a.best_metric, greater_is_better=a.greater_is_better,
                load_best_at_end=a.load_best_at_end,
                early_stopping_patience=a.early_stopping_patience)


def _shared_kwargs(a) -> dict:
    return dict(**_eval_kwargs(a), model=a.model, output_dir=a.output_dir, attn_backend=a.attn_backend, dtype=a.dtype,
                lora_r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                lora_targets=tuple(t.strip() for t in a.lora_targets.split(",") if t.strip()),
                fused_lora=not a.no_fused_lora,
                max_steps=a.max_steps, grad_accum=a.grad_accum, gradient_checkpointing=a.gradient_checkpointing,
                seed=a.seed, max_train_seconds=a.max_train_seconds, logging_steps=a.logging_steps,
                save_steps=a.save_steps, save_total_limit=a.save_total_limit, resume_from_checkpoint=a.resume,
                overwrite_output_dir=a.overwrite_output_dir, lr_schedule_epochs=a.lr_schedule_epochs,
                extra_training_args=dict(a.training_arg or []),
                disable_tqdm=True if a.no_progress else None)


# TrainingArguments fields --training-arg must not set: those with a flag of their own (checked there), and those
# the trainer sets itself (its checkpoints, evaluation, precision and data order depend on them)
TRAINING_ARG_FLAGS = {
    "output_dir": "--output-dir", "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum", "learning_rate": "--learning-rate", "max_steps": "--max-steps",
    "warmup_steps": "--warmup-steps", "logging_steps": "--logging-steps", "save_steps": "--save-steps",
    "save_total_limit": "--save-total-limit", "seed": "--seed", "num_train_epochs": "--lr-schedule-epochs",
    "gradient_checkpointing": "--gradient-checkpointing", "resume_from_checkpoint": "--resume",
    "overwrite_output_dir": "--overwrite-output-dir", "disable_tqdm": "--no-progress",
    "eval_steps": "--eval-steps", "load_best_model_at_end": "--load-best-at-end",
    "metric_for_best_model": "--best-metric", "greater_is_better": "--greater-is-better",
}
TRAINING_ARG_MANAGED = {"save_strategy", "remove_unused_columns", "data_seed", "bf16", "fp16", "use_cpu",
                        "dataloader_drop_last", "ddp_find_unused_parameters", "eval_strategy", "do_train", "do_eval",
                        "logging_first_step", "gradient_checkpointing_kwargs", "label_names"}


def _training_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of --training-arg: KEY a TrainingArguments field this tool leaves open, VALUE parsed as JSON
    when it is JSON."""
    import dataclasses

    from transformers import TrainingArguments

    key, sep, value = text.partition("=")
    key = key.strip()
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if not sep or key not in fields:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a transformers TrainingArguments field, got "
                                         f"{text!r}")
    if key in TRAINING_ARG_FLAGS:
        raise argparse.ArgumentTypeError(f"{key} has its own flag: use {TRAINING_ARG_FLAGS[key]}")
    if key in TRAINING_ARG_MANAGED:
        raise argparse.ArgumentTypeError(f"{key} is set by the trainer itself (its checkpoints, evaluation, "
                                         f"precision or data order depend on it)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _ckpt(value):
    """--gradient-checkpointing's value: True (all layers), a layer count >= 1 or a fraction in (0, 1]."""
    if value in (None, False):
        return False
    if value is True or value == "all":
        return True
    try:
        number = float(value) if "." in value else int(value)
    except ValueError:
        number = None
    if number is None or not (0 < number <= 1 if isinstance(number, float) else number >= 1):
        raise argparse.ArgumentTypeError(f"expected a layer count >= 1, a fraction in (0, 1] or all, got {value!r}")
    return number


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _mean_loss(result: dict):
    """The mean loss of the whole run, resumed parts included: the logged losses (each the mean over the steps since
    the previous log) weighted by those step counts. The Trainer's own train_loss covers only this process's steps."""
    losses = result.get("losses") or []
    if not losses:
        return result.get("train_loss")
    total, steps, prev = 0.0, 0, 0
    for row in sorted(losses, key=lambda r: r["step"]):
        n = row["step"] - prev
        total, steps, prev = total + n * row["loss"], steps + n, row["step"]
    return total / steps if steps else result.get("train_loss")


def _report(result: dict) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun: one result line, from rank 0
    last = result["losses"][-1] if result["losses"] else None
    # steps: where training ended; the last loss the Trainer logged (every --logging-steps) with its own step, and the
    # mean loss of this run's steps
    line = {"output_dir": result["output_dir"], "steps": result.get("global_step"),
            "last_logged_step": last and last["step"], "last_logged_loss": last and last["loss"],
            "mean_train_loss": _mean_loss(result), "train_runtime_s": result.get("train_runtime")}
    if result.get("stopped_by_time_at") is not None:
        line["stopped_by_time_at"] = result["stopped_by_time_at"]
    if result.get("evaluations"):
        line["last_eval"] = result["evaluations"][-1]
        line["best"] = result["best"]
        line["final_is_best"] = bool(result.get("loaded_best")) or bool(
            result["best"] and result["best"]["step"] == result.get("global_step"))
        if result.get("stopped_early_at") is not None:
            line["stopped_early_at"] = result["stopped_early_at"]
    print(json.dumps(line))
    return 0


# argument fields whose command-line flag is not the field's name with dashes
_FLAG_OF = {"train_files": "--train-file", "validation_files": "--validation-file", "instructions": "--instruction",
            "document_instructions": "--document-instruction",
            "contrast_anchors": "--no-contrast-anchors", "contrast_positives": "--no-contrast-positives",
            "resume_from_checkpoint": "--resume", "guide_model": "--guide-model", "grad_accum": "--grad-accum"}
_ALL_FLAGS: set[str] = set()  # every stage's option strings, filled by add_subcommands


@contextlib.contextmanager
def _flag_names():
    """Errors of the argument checks name fields (``gradcache_chunk_size``); on the command line, say the flags the
    user typed (``--gradcache-chunk-size``)."""
    def flag(m):
        name = m.group(0)
        f = _FLAG_OF.get(name, "--" + name.replace("_", "-"))
        return f if f in _ALL_FLAGS else name

    try:
        yield
    except (ValueError, TypeError) as e:
        raise type(e)(re.sub(r"(?<![\w./-])[a-z]+(?:_[a-z0-9]+)+(?![\w./-])", flag, str(e))) from None


def _no_config(a) -> None:
    if getattr(a, "config", None) is not None:
        # main() expands --config into flags before parsing; a parser built elsewhere must call expand_config too
        raise SystemExit("--config reached the parser unexpanded: pass argv through "
                         "llm2vec_fast.training.original_config.expand_config first")


def _config_option(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--config", default=None, metavar="FILE.json",
                   help=f"a training config of the original llm2vec (its train_configs/{stage}/*.json, as read by "
                        f"experiments/run_{stage}.py): each key becomes the flag it means here, keys left out take "
                        f"the original script's defaults (e.g. LoRA r 8, lora alpha 2 r, 10,000 steps), flags given "
                        f"on the command line win; hub dataset names need --train-file")


def run_mntp(a) -> int:
    """``train mntp``."""
    from .mntp import MNTPArguments, train_mntp

    _no_config(a)
    with _flag_names():
        args = MNTPArguments(train_files=a.train_file, max_seq_length=a.max_seq_length, doc_split=a.doc_split,
                             max_blocks=a.max_blocks, recipe=a.recipe, mlm_probability=a.mlm_probability,
                             mask_token=a.mask_token, learning_rate=a.learning_rate, batch_size=a.batch_size,
                             warmup_steps=a.warmup_steps, release_layout=not a.adapter_only,
                             validation_files=a.validation_file or [],
                             validation_split_percentage=a.validation_split_percentage,
                             max_eval_blocks=a.max_eval_blocks, **_shared_kwargs(a))
    return _report(train_mntp(args))


def _score_range(text: str) -> tuple[float, float]:
    values = _float_list(text)
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or not values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, finite numbers with LOW < HIGH, got {text!r}")
    return values[0], values[1]


def run_contrastive(a) -> int:
    """``train simcse``, ``train supervised`` and ``train scored``."""
    from .contrastive import ContrastiveArguments, train_contrastive

    _no_config(a)
    with _flag_names():
        args = ContrastiveArguments(
            mode=a.mode, train_files=a.train_file, peft=a.peft, instructions=getattr(a, "instruction", None) or [],
            document_instructions=getattr(a, "document_instruction", None) or [],
            split=getattr(a, "split", None), max_examples=a.max_examples, batch_size=a.batch_size,
            max_length=a.max_length, learning_rate=a.learning_rate, scale=a.scale,
            attention_dropout=a.attention_dropout,
            warmup_steps=a.warmup_steps, mask_false_negatives=getattr(a, "mask_false_negatives", False),
            num_negatives=getattr(a, "num_negatives", 1), loss=getattr(a, "loss", None),
            symmetric=getattr(a, "symmetric", False),
            score_range=getattr(a, "score_range", None), guide_model=getattr(a, "guide_model", None),
            guide_margin=getattr(a, "guide_margin", 0.0),
            guide_margin_strategy=getattr(a, "guide_margin_strategy", "absolute"),
            contrast_anchors=not getattr(a, "no_contrast_anchors", False),
            contrast_positives=not getattr(a, "no_contrast_positives", False),
            gradcache_chunk_size=a.gradcache_chunk_size, gradcache_chunk_tokens=a.gradcache_chunk_tokens,
            pooling_mode=a.pooling_mode, matryoshka_dims=a.matryoshka_dims, matryoshka_weights=a.matryoshka_weights,
            **_shared_kwargs(a))
    return _report(train_contrastive(args))


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` with ``mntp``, ``simcse``, ``supervised`` and ``scored`` to an argparse subparsers object."""
    train = subparsers.add_parser(
        "train", help="train an encoder: MNTP, unsupervised SimCSE, supervised contrastive, scored pairs",
        description="LLM2Vec training stages on transformers' Trainer with LoRA. Typical chain: "
                    "`train mntp --output-dir out/mntp` → `train simcse --model out/mntp --output-dir out/simcse` → "
                    "encode with LLM2Vec.from_pretrained('out/mntp', peft_model_name_or_path='out/simcse'). "
                    "Multi-GPU: torchrun --nproc-per-node N -m llm2vec_fast.training.cli train ...")
    stages = train.add_subparsers(dest="stage", metavar="{mntp,simcse,supervised,scored}", required=True)
    parsers = []

    p = stages.add_parser(
        "mntp", help="masked next-token prediction (LLM2Vec step 2)",
        description="Masked next-token prediction on plain text: tokens at masked positions are predicted from the "
                    "previous position's output with the bidirectional model; LoRA r16/α32 on all linear layers. "
                    "Defaults: the original recipe (batch 32 × 512 tokens, lr 5e-5, 1000 steps, p 0.2 with 80/10/10). "
                    "The output folder is a PEFT adapter and, by default, also a base-model folder carrying it "
                    "(the original MNTP release layout; the base weights are hard-linked when possible).")
    p.add_argument("--train-file", action="append", required=True,
                   help="text file, one document per line or blank-line separated (repeatable)")
    p.add_argument("--doc-split", default="auto", choices=["auto", "line", "blank"],
                   help="how files split into documents (auto: blank-line separated if the file has blank lines)")
    p.add_argument("--max-seq-length", type=int, default=512, help="tokens per training block")
    p.add_argument("--max-blocks", type=int, default=None, help="use at most this many blocks")
    p.add_argument("--batch-size", type=int, default=32, help="blocks per device and step")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--recipe", default="llama", choices=["llama", "mistral"],
                   help="llama: p 0.2, 80%% mask / 10%% random / 10%% kept; mistral: p 0.8, all → mask token")
    p.add_argument("--mlm-probability", type=float, default=None, help="override the recipe's masking probability")
    p.add_argument("--mask-token", default="auto", choices=["auto", "blank", "eos", "mask", "auto-eos", "auto-mask"],
                   help="auto: the tokenizer's mask token, else '_' (blank, the original's choice); eos; mask: add "
                        "a new '<mask>' token (its row feeds training only: the output keeps the base vocabulary); "
                        "auto-eos / auto-mask: the tokenizer's mask token, else eos / mask (the original's "
                        "mask_token_type)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the adapter, tokenizer and config (not the base model's files)")
    _common(p)
    g = next(x for x in p._action_groups if x.title == "evaluation during training")
    g.add_argument("--validation-file", action="append", default=None, metavar="FILE",
                   help="held-out text (as --train-file; repeatable): eval_loss, eval_accuracy and eval_perplexity "
                        "over its masked tokens, masked once with --seed")
    g.add_argument("--validation-split-percentage", type=float, default=0.0, metavar="P",
                   help="hold out the first P %% of the training documents instead (the original run_mntp's rule)")
    g.add_argument("--max-eval-blocks", type=int, default=None, metavar="N", help="use at most N held-out blocks")
    _config_option(p, "mntp")
    p.set_defaults(func=run_mntp)
    parsers.append(p)

    for mode, helptext, desc in (
        ("simcse", "unsupervised SimCSE (LLM2Vec step 3)",
         "Each sentence is encoded twice with attention dropout (0.3) and its other view is its positive; in-batch "
         "negatives, cosine × 20, mean pooling, a fresh LoRA on the base with the MNTP adapter merged. Defaults: "
         "batch 128, 128 tokens, lr 3e-5, 1000 steps. Data: one sentence per line."),
        ("supervised", "supervised contrastive training (query / positive / hard negative)",
         "Queries (with instructions), positives and hard negatives from JSONL (query, positive, negative) or CSV "
         "(e.g. sent0, sent1, hard_neg); in-batch plus hard negatives, cosine × 50; batches from one file at a "
         "time when several are given; negatives gathered across GPUs; GradCache for large batches. Defaults: "
         "batch 64 per device, 512 tokens, lr 2e-4, warm-up 300, 1000 steps."),
        ("scored", "training on scored pairs (STS-style: two texts and a similarity score)",
         "Pairs of texts with a gold similarity score (an STS-B TSV, a SICK file, or JSONL / CSV / TSV with "
         "sentence1, sentence2 and score columns): CoSENT (default; sentence-transformers' CoSENTLoss: every pair "
         "the gold scores higher must come out more similar, cosine × 20), AnglE (CoSENT on AnglE's angle "
         "similarity) or cosine (MSE of cosine against the score scaled to 0-1). Batches from one file at a time "
         "when several are given. Defaults: batch 16, 128 tokens, lr 2e-4, warm-up 100, 1000 steps."),
    ):
        p = stages.add_parser(mode, help=helptext, description=desc)
        p.add_argument("--train-file", action="append", required=True,
                       help="sentences, one per line (repeatable)" if mode == "simcse" else
                       "training file (repeatable)")
        p.add_argument("--peft", default=None,
                       help="adapter to merge into --model first (e.g. an --adapter-only MNTP output)")
        p.add_argument("--max-examples", type=int, default=None, help="read at most this many examples per file")
        p.add_argument("--batch-size", type=int, default=None, help="examples per device and step")
        p.add_argument("--max-length", type=int, default=None, help="tokens per text")
        p.add_argument("--learning-rate", type=float, default=None)
        p.add_argument("--warmup-steps", type=int, default=None)
        p.add_argument("--scale", type=float, default=None,
                       help="similarity scale (1 / temperature)" + (": cosent and angle" if mode == "scored" else ""))
        p.add_argument("--attention-dropout", type=float, default=None)
        p.add_argument("--pooling-mode", default="mean",
                       choices=["mean", "weighted_mean", "eos_token", "last_token", "bos_token"])
        p.add_argument("--matryoshka-dims", type=_int_list, default=None, metavar="D1,D2,...",
                       help="Matryoshka loss: also train the first D dimensions of each embedding for every D (e.g. "
                            "2048,1024,512,256,128,64), so that encode --truncate-dim D keeps its quality")
        p.add_argument("--matryoshka-weights", type=_float_list, default=None, metavar="W1,W2,...",
                       help="one loss weight per --matryoshka-dims entry (default 1 each)")
        p.add_argument("--gradcache-chunk-size", type=int, default=None,
                       help="GradCache: encode the batch in chunks of this many texts (memory of a small batch)")
        p.add_argument("--gradcache-chunk-tokens", type=int, default=None,
                       help="GradCache: encode the batch in chunks of at most this many tokens (a bound on activation "
                            "memory, whatever the texts' lengths); instead of --gradcache-chunk-size")
        if mode != "scored":
            p.add_argument("--symmetric", action="store_true",
                           help="also score each positive against the batch's queries (the loss is the mean of both "
                                "directions; sentence-transformers' MultipleNegativesSymmetricRankingLoss)")
        if mode == "supervised":
            p.add_argument("--instruction", action="append", default=None,
                           help="instruction for queries: once for all files, or once per --train-file")
            p.add_argument("--document-instruction", action="append", default=None,
                           help="instruction on the positives and hard negatives too: once for all files, or once "
                                "per --train-file ('' for none); the original's E5 mix does this for its symmetric "
                                "tasks (NLI's similar-text split, duplicate questions)")
            p.add_argument("--split", default=None, help="CSV with a split column: keep rows of this split")
            p.add_argument("--mask-false-negatives", action="store_true",
                           help="drop another query's positive that scores above a query's own positive")
            g = p.add_argument_group("GISTEmbed", "a frozen guide encoder filters false negatives "
                                     "(sentence-transformers' GISTEmbedLoss)")
            g.add_argument("--guide-model", default=None, metavar="FOLDER",
                           help="the guide: a model folder LLM2Vec loads (e.g. a trained encoder, an export-st "
                                "folder); candidates it scores above a query's own positive are left out, and the "
                                "batch's other queries and positives become candidates too")
            g.add_argument("--guide-margin", type=float, default=0.0,
                           help="filter candidates above the guide's positive similarity minus this (default 0)")
            g.add_argument("--guide-margin-strategy", choices=["absolute", "relative"], default="absolute",
                           help="the margin as a difference (absolute) or a fraction of the positive similarity")
            g.add_argument("--no-contrast-anchors", action="store_true",
                           help="with --guide-model: the other queries are not candidates")
            g.add_argument("--no-contrast-positives", action="store_true",
                           help="with --guide-model: positive i is not contrasted with the other positives")
            p.add_argument("--num-negatives", type=int, default=1,
                           help="hard negatives per query (a list value or negative_1, negative_2, ... columns)")
        if mode == "scored":
            p.add_argument("--loss", default="cosent", choices=["cosent", "angle", "cosine"],
                           help="cosent: CoSENT on cosine; angle: CoSENT on AnglE's similarity; cosine: MSE of cosine "
                                "against the score scaled to 0-1")
            p.add_argument("--score-range", type=_score_range, default=None, metavar="LOW,HIGH",
                           help="the scale of the gold scores, mapped to 0-1; matters for --loss cosine only "
                                "(cosent and angle read the order of the scores). Default: 0,5 for STS-B and 1,5 "
                                "for SICK files; other files' scores as they are when within [-1, 1]. Write "
                                "--score-range=-1,1 when LOW is negative")
            p.add_argument("--split", default=None,
                           help="keep the rows whose split column (SICK's SemEval_set: TRAIN, TRIAL, TEST) equals "
                                "this")
            p.add_argument("--instruction", action="append", default=None,
                           help="instruction for both texts of a pair (a symmetric task): once for all files, or "
                                "once per --train-file")
        _common(p)
        if mode != "scored":
            _config_option(p, mode)
        p.set_defaults(func=run_contrastive, mode=mode)
        parsers.append(p)
    _ALL_FLAGS.update(o for p in parsers for action in p._actions for o in action.option_strings)
    return train


def main(argv=None) -> int:
    """Standalone entry (``python -m llm2vec_fast.training.cli train ...``), e.g. under torchrun."""
    from .original_config import ConfigError, expand_config

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    try:
        argv = expand_config(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        parser.exit(2, f"llm2vec-fast: error: {e}\n")
    a = parser.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
