"""Masked next-token prediction (MNTP), LLM2Vec's step 2, on transformers' Trainer.

The bidirectional decoder sees a masked block; the token at a masked position i is predicted from the output at
i − 1. Only those rows reach the LM head (gathered, then the fused linear cross-entropy), so full-vocabulary logits
are never formed for the ~80 % of positions that carry no label. LoRA on every linear layer of the base model; the
adapter is saved with keys of the base model (``LlamaModel``), the layout ``LLM2Vec.from_pretrained(base,
peft_model_name_or_path=out)`` loads.

Python API::

    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp
    result = train_mntp(MNTPArguments(train_files=["wiki.txt"], output_dir="out/mntp", max_steps=1000))
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import check_count
from ..cpu_memory import cpu_work
from ..encoder import write_encoder_config
from .common import (
    LORA_TARGETS,
    TRAINING_NAME,
    AdapterTrainer,
    add_lora,
    add_step_callbacks,
    check_run_arguments,
    default_dtype,
    enable_checkpointing,
    loss_history,
    mixed_precision,
    prepare_output_dir,
    run_identity,
    schedule_steps,
    training_arguments,
    write_json,
)
from .data import BlockDataset, MNTPCollator, read_documents, resolve_mask_token, stack_blocks
from .losses import linear_cross_entropy, shift_masked_rows
from .monitor import EvalArguments, add_eval_callback, encoder_evaluators, load_best

logger = logging.getLogger(__name__)


@dataclass
class MNTPArguments(EvalArguments):
    """Options of an MNTP run; defaults are the original LLM2Vec recipe (Llama family). The evaluation options
    (:class:`~.monitor.EvalArguments`) add held-out masked-token scores: ``validation_files`` or
    ``validation_split_percentage`` (the original ``run_mntp``'s rule: the first P % of the training documents are
    held out), ``max_eval_blocks``."""

    train_files: list[str]
    output_dir: str
    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    max_seq_length: int = 512
    doc_split: str = "auto"  # how a text file splits into documents: auto, line, blank
    max_blocks: int | None = None  # cap on the number of training blocks (quick runs)
    recipe: str = "llama"  # llama: p 0.2, 80/10/10; mistral: p 0.8, all selected -> mask token
    mlm_probability: float | None = None  # overrides the recipe's probability
    mask_token: str = "auto"  # auto (tokenizer's, else "_"), blank ("_"), eos, mask (adds "<mask>")
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    fused_lora: bool = True  # llm2vec_fast.lora.fuse_lora: same values, less memory; False = peft's own forward
    learning_rate: float = 5e-5
    batch_size: int = 32  # per device
    grad_accum: int = 1
    max_steps: int = 1000
    warmup_steps: int = 0
    gradient_checkpointing: bool | int | float = False  # True: every layer; k: the first k; 0.5: half of them
    attn_backend: str = "auto"
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    seed: int = 42
    max_train_seconds: float | None = None  # stop (and save) after this much wall clock, even before max_steps
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = None
    resume_from_checkpoint: str | bool | None = None
    overwrite_output_dir: bool = False  # start afresh in an output_dir that holds an earlier run
    release_layout: bool = True  # also write the base config into the output (original MNTP release layout)
    disable_tqdm: bool | None = None
    dataloader_num_workers: int = 0
    extra_training_args: dict = field(default_factory=dict)
    # the learning-rate schedule spans this many epochs of the data (the original scripts' num_train_epochs); training
    # stops at max_steps or at the end of those epochs, whichever comes first. None: the schedule spans max_steps
    lr_schedule_epochs: float | None = None
    validation_files: list[str] = field(default_factory=list)  # held-out text files (as train_files)
    validation_split_percentage: float = 0.0  # else: hold out the first P % of the training documents
    max_eval_blocks: int | None = None  # cap on held-out blocks

    def __post_init__(self):
        check_run_arguments(self)
        if not (isinstance(self.validation_split_percentage, (int, float)) and
                0.0 <= self.validation_split_percentage < 100.0):
            raise ValueError("validation_split_percentage must be a number in [0, 100), got "
                             f"{self.validation_split_percentage!r}")
        if self.validation_files and self.validation_split_percentage:
            raise ValueError("give validation_files or validation_split_percentage, not both: got "
                             f"{self.validation_files} and {self.validation_split_percentage}")
        check_count("max_eval_blocks", self.max_eval_blocks, optional=True)
        if self.max_eval_blocks is not None and not (self.validation_files or self.validation_split_percentage):
            raise ValueError("max_eval_blocks given without validation_files or validation_split_percentage: it "
                             "would have no effect")
        self.check_eval_arguments()

    def evaluates(self) -> bool:
        return super().evaluates() or bool(self.validation_files or self.validation_split_percentage)

    def known_metrics(self) -> set[str]:
        held_out = self.validation_files or self.validation_split_percentage
        return super().known_metrics() | ({"eval_loss", "eval_accuracy", "eval_perplexity"} if held_out else set())


class MNTPModel(nn.Module):
    """What the Trainer trains: the LoRA-wrapped bidirectional base model plus the frozen LM head.

    A ``[B, L]`` batch runs packed (its real tokens back to back in one row, ``cu_seqlens`` marking the blocks) when
    the backbone's attention is llm2vec_fast's: no padded token is computed, and the attention kernel reads q, k
    and v where the projections wrote them instead of gathered copies. ``packed=False`` (or another attention
    implementation) runs the ``[B, L]`` batch as it is.
    """

    accepts_loss_kwargs = False  # a per-batch mean: the Trainer divides it by the accumulation steps

    def __init__(self, backbone: nn.Module, lm_head: nn.Linear, packed: bool = True):
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.packed = packed
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
        rows, targets = self.masked_rows(input_ids, labels, attention_mask)
        return {"loss": linear_cross_entropy(rows, self.lm_head.weight, targets)}

    def masked_rows(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The backbone's output rows that predict a masked token, and those tokens: ``(rows [N, H], targets
        [N])`` (:func:`~.losses.shift_masked_rows`)."""
        if self.lm_head.bias is not None:
            raise ValueError("LM heads with a bias are not supported by the fused MNTP loss")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if self.packed and _runs_packed(self.backbone):
            feats, keep = pack_rows(input_ids, attention_mask)
            hidden = self.backbone(**feats, use_cache=False).last_hidden_state[0]  # (T, H)
            flat = labels.reshape(-1) if keep is None else labels[keep]
            return shift_masked_rows(hidden, flat, feats["cu_seq_lens_q"])
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return shift_masked_rows(hidden, labels)


class MaskedValidation:
    """Held-out MNTP blocks, masked once with a fixed seed (every evaluation scores the same masks, and none draws
    from the training's random streams): ``fn(model) -> {"eval_loss", "eval_accuracy", "eval_perplexity"}``, the
    mean cross-entropy, top-1 accuracy and perplexity over the masked tokens."""

    def __init__(self, blocks: torch.Tensor, masker: MNTPCollator, seed: int, batch_size: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            masked = masker.mask(blocks)
        self.input_ids, self.labels, self.batch_size = masked["input_ids"], masked["labels"], batch_size

    def __len__(self):
        return self.input_ids.shape[0]

    def __call__(self, model: MNTPModel) -> dict:
        weight = model.lm_head.weight
        dev = weight.device
        # logits of at most ~32M entries at a time, for the top-1 count
        chunk = max(1, 2 ** 25 // weight.shape[0])
        loss_sum, correct, n = 0.0, 0, 0
        for i in range(0, len(self), self.batch_size):
            rows, targets = model.masked_rows(self.input_ids[i:i + self.batch_size].to(dev),
                                              self.labels[i:i + self.batch_size].to(dev))
            if targets.numel() == 0:
                continue
            loss_sum += float(linear_cross_entropy(rows, weight, targets)) * targets.numel()
            for j in range(0, targets.numel(), chunk):
                logits = torch.nn.functional.linear(rows[j:j + chunk].to(weight.dtype), weight)
                correct += int((logits.argmax(-1) == targets[j:j + chunk]).sum())
            n += targets.numel()
        if n == 0:
            raise ValueError(f"the {len(self)} validation blocks hold no masked token to score")
        loss = loss_sum / n
        return {"eval_loss": loss, "eval_accuracy": correct / n, "eval_perplexity": math.exp(min(loss, 700.0))}


def _runs_packed(model) -> bool:
    from llm2vec_fast.bidirectional import ATTN_IMPLEMENTATION, CAUSAL_IMPLEMENTATION

    return getattr(model.config, "_attn_implementation", None) in (ATTN_IMPLEMENTATION, CAUSAL_IMPLEMENTATION)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """A ``[B, L]`` batch as one packed row: ``(model kwargs, keep)``.

    The kwargs hold ``input_ids`` and ``position_ids`` ``[1, T]`` (each token keeps the position it has in its row,
    as Hugging Face's padded forward gives it) and the ``cu_seq_lens_*`` / ``max_length_*`` of the rows' real
    tokens; ``keep`` is the bool ``[B, L]`` mask of those tokens, or None when every token is real.
    """
    B, L = input_ids.shape
    dev = input_ids.device
    pos = torch.arange(L, device=dev)
    if attention_mask is None or bool(attention_mask.all()):
        keep, flat, positions = None, input_ids.reshape(-1), pos.repeat(B)
        lengths = torch.full((B,), L, device=dev, dtype=torch.int32)
        longest = L
    else:
        keep = attention_mask.bool()
        flat, positions = input_ids[keep], pos.expand(B, L)[keep]
        lengths = keep.sum(1, dtype=torch.int32)
        longest = int(lengths.max())
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    feats = dict(input_ids=flat[None], position_ids=positions[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=longest, max_length_k=longest)
    return feats, keep


class MNTPTrainer(AdapterTrainer):
    """Trainer for :class:`MNTPModel` (adapter-only checkpoints).

    Masking runs here, in the training step, rather than in the data collator: the Trainer restores the RNG state
    of a checkpoint right before the first resumed step, but the data loader has already collated (and, under
    accelerate, pre-fetched) batches by then, so masks drawn in the collator would differ after a resume.
    """

    def __init__(self, *args, masker: MNTPCollator, **kwargs):
        super().__init__(*args, **kwargs)
        self.peft_module = self.model.backbone
        self.masker = masker

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            inputs = {**inputs, **self.masker.mask(inputs["input_ids"])}
        out = model(input_ids=inputs["input_ids"], labels=inputs["labels"],
                    attention_mask=inputs.get("attention_mask"))
        return (out["loss"], out) if return_outputs else out["loss"]


def load_causal_lm(model_name_or_path, dtype: torch.dtype, attn_backend: str = "auto"):
    """Load a ``*ForCausalLM`` and its tokenizer, bidirectional, with the fused RMSNorm/gated-MLP ops on CUDA (not with
    ``attn_backend="torch"``, the all-PyTorch reference path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2vec_fast import fuse_ops, resolve_model, to_bidirectional

    path = resolve_model(model_name_or_path)
    if (Path(path) / "adapter_config.json").is_file():
        raise ValueError(f"{path} carries a LoRA adapter (an MNTP output?): MNTP trains a fresh adapter on a base "
                         "model, and this one would be ignored. To continue that run, use its checkpoints (--resume); "
                         "to train on top of it, merge it first (LLM2Vec.from_pretrained(folder).save(new_folder), "
                         "a causal LM's head included only in the folder's base) or start from its base model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    to_bidirectional(model, attn_backend)
    if attn_backend != "torch":
        fuse_ops(model)
    return model, tokenizer, path


def build_mntp(args: MNTPArguments):
    """Model, tokenizer, dataset and collator of an MNTP run (no Trainer yet)."""
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype()
    causal_lm, tokenizer, base_path = load_causal_lm(args.model, dtype, args.attn_backend)
    mask_id = resolve_mask_token(tokenizer, args.mask_token)
    if len(tokenizer) > causal_lm.get_input_embeddings().weight.shape[0]:
        from transformers import set_seed

        set_seed(args.seed)  # the new row is drawn at random: the same in a resumed run
        causal_lm.resize_token_embeddings(len(tokenizer))  # the added "<mask>" token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    docs = []
    for f in args.train_files:
        docs.extend(read_documents(f, args.doc_split))
    held_out = []
    for f in args.validation_files:
        held_out.extend(read_documents(f, args.doc_split))
    if args.validation_files and not held_out:
        raise ValueError(f"validation_files {args.validation_files} hold no text")
    if args.validation_split_percentage:
        k = math.ceil(len(docs) * args.validation_split_percentage / 100)
        if k >= len(docs):
            raise ValueError(f"validation_split_percentage {args.validation_split_percentage} holds out {k} of the "
                             f"{len(docs)} training documents, leaving none to train on")
        held_out, docs = docs[:k], docs[k:]
    try:
        dataset = BlockDataset(docs, tokenizer, args.max_seq_length, max_blocks=args.max_blocks)
    except ValueError as e:
        raise ValueError(f"train_files {args.train_files}: {e}"
                         + (" (after holding out the validation split)" if args.validation_split_percentage else "")
                         + "; give more text (or a shorter max_seq_length)") from None
    collator = MNTPCollator.recipe(args.recipe, tokenizer, mask_id, args.mlm_probability)
    validation = None
    if held_out:
        try:
            blocks = BlockDataset(held_out, tokenizer, args.max_seq_length, max_blocks=args.max_eval_blocks).blocks
        except ValueError as e:
            where = (f"validation_files {args.validation_files}" if args.validation_files else
                     f"the held-out {args.validation_split_percentage} % of the training documents")
            raise ValueError(f"{where}: {e}; give more held-out text (or a shorter max_seq_length)") from None
        validation = MaskedValidation(blocks, collator, args.seed, args.batch_size)
    from transformers import set_seed

    set_seed(args.seed)  # LoRA's random init: the same on every rank and in every run
    backbone = add_lora(causal_lm.get_decoder(), args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets,
                      fused=args.fused_lora)
    if args.gradient_checkpointing:
        enable_checkpointing(backbone, args.gradient_checkpointing)
    model = MNTPModel(backbone, causal_lm.get_output_embeddings())
    model.validation = validation
    return model, tokenizer, dataset, collator, base_path


def train_mntp(args: MNTPArguments) -> dict:
    """Run MNTP and write the adapter, tokenizer and ``llm2vec_config.json`` to ``args.output_dir``.

    Returns ``{"output_dir", "base_model", "losses": [{"step", "loss"}], "train_runtime", "blocks"}``.
    """
    prepare_output_dir(args)
    model, tokenizer, dataset, collator, base_path = build_mntp(args)
    sched = schedule_steps(args, len(dataset), int(os.environ.get("WORLD_SIZE", "1")), drop_last=False)
    targs = training_arguments(
        args.output_dir, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.learning_rate,
        max_steps=min(args.max_steps, sched or args.max_steps), warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, seed=args.seed,
        **mixed_precision(args.dtype), disable_tqdm=args.disable_tqdm,
        dataloader_num_workers=args.dataloader_num_workers, extra=args.extra_training_args)
    trainer = MNTPTrainer(model=model, args=targs, train_dataset=dataset, data_collator=stack_blocks,
                          processing_class=tokenizer, masker=collator)
    trainer.run_identity = run_identity(args)
    trainer.schedule_steps = sched
    counter, limit = add_step_callbacks(trainer, args.max_train_seconds)
    monitor = _monitor(trainer, model, tokenizer, args, base_path)
    with cpu_work(trainer.args.device):  # CPU: activations reuse freed heap memory (cpu_memory)
        out = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    losses = loss_history(trainer)
    evals = monitor.summary() if monitor else {}
    if limit and limit.stopped_at is not None:
        evals["stopped_by_time_at"] = limit.stopped_at  # recorded with the output: the run ended before max_steps
    if trainer.args.should_save:
        evals["loaded_best"] = bool(monitor and args.load_best_at_end and load_best(trainer, monitor))
        save_mntp_output(model.backbone, tokenizer, args, base_path, losses, evals)
    return {"output_dir": args.output_dir, "base_model": base_path, "losses": losses,
            "train_runtime": out.metrics.get("train_runtime"), "global_step": out.global_step,
            "train_loss": out.training_loss, "steps_run": counter.steps, "blocks": len(dataset),
            "stopped_at": limit and limit.stopped_at, **evals}


def _monitor(trainer, model: MNTPModel, tokenizer, args: MNTPArguments, base_path: str):
    """The evaluation callback of a run that asks for one (None otherwise): held-out masked tokens, and the
    embedding scores through an encoder on the backbone being trained (mean pooling, as the output's config)."""
    if not args.evaluates():
        return None
    scorers = []
    if model.validation is not None:
        scorers.append(lambda: model.validation(model))
    embedders = encoder_evaluators(args, model.backbone.config.hidden_size)
    if embedders:
        from llm2vec_fast import LLM2Vec

        encoder = LLM2Vec(model.backbone, tokenizer, pooling_mode="mean", max_length=max(512, args.max_seq_length))
        scorers.extend(lambda fn=fn: fn(encoder) for fn in embedders)

    def save(folder, extra):
        save_mntp_output(model.backbone, tokenizer, args, base_path, loss_history(trainer), extra, folder=folder)

    return add_eval_callback(trainer, args, scorers, save, model)


def save_mntp_output(backbone, tokenizer, args: MNTPArguments, base_path: str, losses: list[dict],
                     evaluations: dict | None = None, folder: str | os.PathLike | None = None) -> None:
    """Adapter + tokenizer + ``llm2vec_config.json``; with ``release_layout`` also the base model's files, so the
    folder is a base model carrying its adapter (the original MNTP release layout): ``LLM2Vec.from_pretrained(out)``
    (ours or the original) merges the adapter, and SimCSE can take the folder as its MNTP-merged base. ``folder``:
    write there instead of ``args.output_dir`` (the best evaluation's copy)."""
    out = Path(folder or args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.release_layout:
        link_base_files(base_path, out)
    if len(tokenizer) > _base_vocab(base_path, len(tokenizer)):
        # an added "<mask>" row only ever feeds MNTP's inputs: the output keeps the base vocabulary (adapter without
        # the resized embedding matrix, the base tokenizer), so it loads on the unchanged base model like any other
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    backbone.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)
    # the encoder's max_length is not the training block length: texts keep the encoder's default 512 tokens
    write_encoder_config(out, {"pooling_mode": "mean", "max_length": max(512, args.max_seq_length),
                                 "doc_max_length": 400,
                                 "skip_instruction": True, "bidirectional": True})
    write_json(out / TRAINING_NAME, {"stage": "mntp", "base_model": base_path, "arguments": dataclasses.asdict(args),
                                     "losses": losses, **(evaluations or {})})


def _base_vocab(base_path: str, default: int) -> int:
    """The base model's embedding rows (its config's vocab_size), or ``default`` when unreadable."""
    try:
        cfg = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return default
    cfg = cfg.get("text_config", cfg)
    return int(cfg.get("vocab_size", default))


_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def link_base_files(base_path: str, out: Path) -> None:
    """Hard-link (else copy) the base model's config and weights into ``out``."""
    base = Path(base_path)
    if not base.is_dir():
        logger.warning("base model %s is not a local folder: the release layout needs its files; skipped", base_path)
        return
    names = [p.name for p in base.iterdir() if p.is_file() and (p.name in _MODEL_FILES or
                                                                 p.name.startswith("model-0"))]
    for name in names:
        dst = out / name
        if dst.exists():
            dst.unlink()
        try:
            os.link(base / name, dst)
        except OSError:
            shutil.copy2(base / name, dst)
