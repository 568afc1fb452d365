"""Pieces the MNTP and contrastive drivers share: model loading, LoRA, Trainer plumbing that saves and resumes
adapters only, and the output folder layout."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

logger = logging.getLogger(__name__)

# LLM2Vec's LoRA: every linear layer of the decoder blocks
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_NAME = "llm2vec_config.json"
TRAINING_NAME = "llm2vec_training.json"
# in each checkpoint: which run made it (stage, base model, adapter merged in), checked when a run resumes from it
RUN_MARKER = "llm2vec_checkpoint.json"


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 weights on CUDA (the original's ``torch_dtype bfloat16``), fp32 on CPU."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, targets=LORA_TARGETS):
    """peft LoraConfig with LLM2Vec's defaults (r 16, alpha 32, dropout 0.05, all linear layers), no task type:
    it is applied to the base model (``LlamaModel``), so adapter keys match what ``LLM2Vec`` loads."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type=None)


def add_lora(base_model, r=16, alpha=32, dropout=0.05, targets=LORA_TARGETS, fused=True):
    """Wrap ``base_model`` with a fresh LoRA adapter; only the adapter trains. ``fused`` routes the LoRA layers
    through :func:`llm2vec_fast.lora.fuse_lora` (the same values; less kept for the backward, fewer passes)."""
    from peft import get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in base_model.named_modules()}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in base_model.named_modules() if isinstance(m, torch.nn.Linear)})
    given = list(targets)
    unknown = [t for t in given if t not in present]
    if unknown and tuple(given) != tuple(LORA_TARGETS):
        # the default list is trimmed to what a family has (not every family has gate/up); a list the user gave is
        # not: a typo there would silently leave a layer untrained
        raise ValueError(f"LoRA target module(s) {', '.join(map(repr, unknown))} do not exist in "
                         f"{type(base_model).__name__}; its linear layers are {', '.join(linear)}")
    targets = [t for t in given if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {tuple(given)} exist in {type(base_model).__name__}; its "
                         f"linear layers are {', '.join(linear)}")
    model = get_peft_model(base_model, lora_config(r, alpha, dropout, targets))
    if fused:
        from llm2vec_fast.lora import fuse_lora

        fuse_lora(model)
    return model


def enable_checkpointing(model, layers: bool | int | float = True) -> int:
    """Gradient checkpointing on the HF model inside (non-reentrant: works with frozen inputs and LoRA); returns how
    many decoder layers recompute their activations in the backward.

    ``layers``: ``True`` every decoder layer (Hugging Face's ``gradient_checkpointing_enable``); an int ``k`` the
    first ``k`` layers only; a float in (0, 1] that fraction of them (rounded up). Each layer left out keeps its
    activations: memory between none and full checkpointing, for less recompute than full checkpointing.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = [m for m in target.modules() if hasattr(type(m), "gradient_checkpointing")
              and type(m).__name__.endswith("DecoderLayer")]
    if not blocks and layers is not True and layers:
        raise ValueError(f"checkpointing part of the layers ({layers!r}) needs decoder layers with a "
                         f"gradient_checkpointing flag; {type(target).__name__} has none (use True for all)")
    n = len(blocks) if layers is True else _checkpointed_count(layers, len(blocks))
    if n == 0 and layers is not True:
        return 0
    hf_checkpointing_enable(target)
    if hasattr(target.config, "use_cache"):
        target.config.use_cache = False
    for block in blocks[n:]:
        block.gradient_checkpointing = False
    return n


def hf_checkpointing_enable(model, use_reentrant: bool = False):
    """Hugging Face's checkpointing switch on every decoder layer: ``activation_checkpointing_enable`` where
    transformers has it (its ``gradient_checkpointing_enable`` is then a deprecated alias), else the older name."""
    kwargs = {"use_reentrant": use_reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _checkpointed_count(layers, total: int) -> int:
    if layers is True:
        return total
    if layers is False or layers is None:
        return 0
    if isinstance(layers, float) and not isinstance(layers, bool):
        if not 0.0 < layers <= 1.0:
            raise ValueError(f"a fraction of layers to checkpoint must be in (0, 1], got {layers}")
        return math.ceil(layers * total)
    if isinstance(layers, int):
        if layers < 0:
            raise ValueError(f"the number of layers to checkpoint must be >= 0, got {layers}")
        if layers > total:
            raise ValueError(f"gradient checkpointing of {layers} layers asked, the model has {total} decoder layers "
                             f"(give at most {total}, or all)")
        return layers
    raise TypeError(f"gradient checkpointing takes True/False, a layer count or a fraction, got {layers!r}")


def _check_scheduler(extra: dict) -> None:
    """A scheduler type / keyword arguments given through extra_training_args (--training-arg) are tried on a dummy
    optimizer now, so that a bad combination fails before the model loads, naming them."""
    if "lr_scheduler_type" not in extra and "lr_scheduler_kwargs" not in extra:
        return
    from transformers import get_scheduler

    kind = extra.get("lr_scheduler_type", "linear")
    kwargs = extra.get("lr_scheduler_kwargs") or {}
    try:
        get_scheduler(kind, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                      num_warmup_steps=0, num_training_steps=10, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"training arguments (--training-arg) lr_scheduler_type={kind!r} with "
                         f"lr_scheduler_kwargs={kwargs!r} do not make a scheduler: {e}") from None


def as_lists(args) -> None:
    """``train_files``, ``validation_files`` and ``instructions`` given as one path or string become a list of one
    (iterating a string would read one file per character); anything else that is not a list is a TypeError."""
    for name in ("train_files", "validation_files", "instructions", "document_instructions"):
        v = getattr(args, name, None)
        if isinstance(v, (str, os.PathLike)):
            setattr(args, name, [v])
        elif v is not None and not isinstance(v, (list, tuple)):
            raise TypeError(f"{name} must be a list (or one path / string), got {type(v).__name__} {v!r}")


def check_run_arguments(args) -> None:
    """Checks every stage's arguments share, before anything loads: counts in range (the error names the field),
    local ``model`` / ``peft`` paths made absolute (the training record must find them from any directory), and an
    ``output_dir`` that is not the folder a run trains from (the outputs would overwrite it)."""
    def bad(name, want):
        raise ValueError(f"{name} must be {want}, got {getattr(args, name)!r}")

    as_lists(args)
    for name in ("max_steps", "grad_accum", "logging_steps", "batch_size", "max_blocks", "max_examples",
                 "max_seq_length", "max_length"):
        v = getattr(args, name, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            bad(name, "an int >= 1" + (" or None" if name.startswith("max_") and name != "max_steps" else ""))
    for name in ("save_steps", "warmup_steps", "dataloader_num_workers"):
        v = getattr(args, name, None)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            bad(name, "an int >= 0" + (" (0: no checkpoints)" if name == "save_steps" else ""))
    limit = getattr(args, "save_total_limit", None)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        bad("save_total_limit", "an int >= 1 (keep that many checkpoints) or None (keep all)")
    lr = getattr(args, "learning_rate", None)
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        bad("learning_rate", "a number > 0")
    _check_scheduler(getattr(args, "extra_training_args", None) or {})
    epochs = getattr(args, "lr_schedule_epochs", None)
    if epochs is not None and not (isinstance(epochs, (int, float)) and not isinstance(epochs, bool)
                                   and math.isfinite(epochs) and epochs > 0):
        bad("lr_schedule_epochs", "a number > 0 or None (the schedule spans max_steps)")
    alpha = getattr(args, "lora_alpha", None)
    if alpha is not None and not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
                                  and math.isfinite(alpha) and alpha > 0):
        bad("lora_alpha", "a number > 0 (the adapter's output is scaled by lora_alpha / r: 0 would train nothing)")
    if getattr(args, "max_train_seconds", None) is not None and not args.max_train_seconds > 0:
        bad("max_train_seconds", "> 0 or None")
    if not args.output_dir:
        raise ValueError("output_dir must be a folder path, got an empty value")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise ValueError(f"output_dir {args.output_dir!r} is a file; give a folder path")
    out = Path(args.output_dir).resolve()
    for name in ("model", "peft"):
        v = getattr(args, name, None)
        if v is not None and not Path(v).exists() and ("/" in v or "\\" in v):
            from ..models import resolve_model

            resolve_model(v)  # a mistyped local folder ("out/mntp" where ./out exists) is named now, before any hub
        if v is None or not Path(v).exists():
            continue  # None (the default model) or a hub id
        setattr(args, name, str(Path(v).resolve()))
        if Path(v).resolve() == out:
            raise ValueError(f"output_dir {args.output_dir!r} is the {name} folder this run trains from: its outputs "
                             "would overwrite it; give another output_dir")


# what a resumed run must share with its checkpoint's for the same loss curve: the learning-rate schedule and the
# batches (the Trainer restores the scheduler's state, so a changed value would be recorded but not used). A larger
# max_steps is allowed: it trains further, on a schedule stretched to the new length
_SCHEDULE_KEYS = ("learning_rate", "lr_schedule_epochs", "warmup_steps", "grad_accum", "batch_size")


def run_identity(args) -> dict:
    """What a checkpoint must share with the run that resumes from it: the stage, the base model and the adapter
    merged into it, and the schedule and batch arguments."""
    return {"stage": getattr(args, "mode", "mntp"), "model": getattr(args, "model", None),
            "peft": getattr(args, "peft", None), **{k: getattr(args, k, None) for k in _SCHEDULE_KEYS}}


def _checkpoint_step(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def _complete_checkpoint(path: Path) -> bool:
    # the Trainer writes trainer_state.json after the adapter and optimizer: a folder without it was cut short
    return (path / "trainer_state.json").is_file() and (path / "adapter_model.safetensors").is_file()


def prepare_output_dir(args) -> None:
    """Before anything loads: an ``output_dir`` holding an earlier run is refused unless the run resumes it
    (``resume_from_checkpoint``) or starts afresh (``overwrite_output_dir``: the earlier checkpoints are removed; an
    earlier ``best/`` is set aside by the evaluation, never deleted). ``resume_from_checkpoint=True`` becomes the
    last *complete* checkpoint (one a run stopped while saving is skipped, with a warning); a checkpoint named
    explicitly must be complete, and any checkpoint must come from the same stage, base model and merged adapter."""
    out = Path(args.output_dir)
    checkpoints = sorted((c for c in out.glob("checkpoint-*") if c.is_dir() and _checkpoint_step(c) >= 0),
                         key=_checkpoint_step) if out.is_dir() else []
    resume = args.resume_from_checkpoint
    if resume:
        if resume is True:
            complete = [c for c in checkpoints if _complete_checkpoint(c)]
            if not complete:
                cut = [c.name for c in checkpoints]
                raise ValueError(f"nothing to resume in {out}: no complete checkpoint-N folder"
                                 + (f" ({', '.join(cut)} were cut short while saving)" if cut else "")
                                 + "; run without resume to start afresh")
            chosen = complete[-1]
            for c in checkpoints:
                if _checkpoint_step(c) > _checkpoint_step(chosen):
                    logger.warning("skipping %s: it was cut short while saving (no trainer_state.json); resuming "
                                   "from %s", c, chosen.name)
            args.resume_from_checkpoint = str(chosen)
        else:
            chosen = Path(resume)
            if not chosen.is_dir():
                raise FileNotFoundError(f"resume: checkpoint folder {str(resume)!r} not found")
            if not _complete_checkpoint(chosen):
                run_folder = any(chosen.glob("checkpoint-*")) or (chosen / TRAINING_NAME).exists()
                raise ValueError(f"resume: {resume} is not a complete checkpoint (no trainer_state.json and adapter): "
                                 + ("it is a run's output folder; resume without a path takes the last checkpoint "
                                    "of output_dir" if run_folder else
                                    "a run stopped while saving it? resume from an earlier one"))
        marker = chosen / RUN_MARKER
        if marker.is_file():
            made_by, this = json.loads(marker.read_text()), run_identity(args)
            # a marker written before the schedule keys were recorded has none of them: nothing to compare there
            diff = [k for k in this if (k in made_by or k not in _SCHEDULE_KEYS) and made_by.get(k) != this[k]]
            if diff:
                what = ("stage and model" if any(k not in _SCHEDULE_KEYS for k in diff) else
                        "arguments (the schedule and batches continue from the checkpoint's, so a changed value "
                        "would be recorded but not used)")
                raise ValueError(f"resume: {chosen} is a checkpoint of another run ("
                                 + ", ".join(f"{k}: {made_by.get(k)!r}, this run: {this[k]!r}" for k in diff)
                                 + f"); resume it with its own {what}, or start afresh")
        return
    found = [c.name for c in checkpoints] + [n for n in ("adapter_model.safetensors", TRAINING_NAME)
                                             if (out / n).exists()]
    if not found:
        return
    if not getattr(args, "overwrite_output_dir", False):
        raise ValueError(f"output_dir {out} holds an earlier run ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): resume it (--resume), start afresh there "
                         "(--overwrite-output-dir: its checkpoints are removed), or give another output_dir")
    if int(os.environ.get("RANK", "0")) == 0:
        for c in checkpoints:
            shutil.rmtree(c)
        if checkpoints:
            logger.warning("overwrite_output_dir: removed the earlier run's %s from %s",
                           ", ".join(c.name for c in checkpoints), out)
        if (out / "best").is_dir():  # a best model is a result: set aside, never deleted
            logger.warning("overwrite_output_dir: moved the earlier run's best/ to %s", set_aside(out / "best"))


def set_aside(folder: Path) -> Path:
    """Rename ``folder`` to the first free ``<name>.set-aside-N`` beside it; returns the new path."""
    n = 1
    while folder.with_name(f"{folder.name}.set-aside-{n}").exists():
        n += 1
    aside = folder.with_name(f"{folder.name}.set-aside-{n}")
    os.replace(folder, aside)
    return aside


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


class AdapterTrainer(Trainer):
    """Trainer whose checkpoints hold the LoRA adapter only (``self.peft_module``), not the frozen base weights.

    The model handed to the Trainer is a small wrapper module; ``peft_module`` is the ``PeftModel`` inside it.
    Resuming loads the adapter back and lets the Trainer restore optimizer, scheduler, RNG and data position.
    """

    peft_module = None  # set by subclasses' __init__
    run_identity = None  # the drivers set it: written into every checkpoint (RUN_MARKER)
    schedule_steps = None  # the learning-rate schedule's length when it is not max_steps (lr_schedule_epochs)
    _nonfinite = None  # a device bool: some micro-step's loss since the last check was not finite

    def create_scheduler(self, num_training_steps, optimizer=None):
        return super().create_scheduler(self.schedule_steps or num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.watch_loss(super().training_step(model, inputs, num_items_in_batch))

    def watch_loss(self, loss):
        """Mark ``loss`` in the non-finite flag :class:`FiniteLossGuard` reads (a device op, no sync); returns it."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        return loss

    def take_nonfinite_loss(self) -> bool:
        """Whether a loss since the last call was not finite (reads the device flag), and clear the flag. Under
        torchrun every process calls it at the same steps and all get the same answer (one NaN rank stops all,
        instead of leaving the others waiting in the next all-reduce)."""
        flag, self._nonfinite = self._nonfinite, None
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.zeros((), dtype=torch.int32, device=self.args.device) if flag is None else flag.to(torch.int32)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t)
        return flag is not None and bool(flag)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # the adapter only: an embedding matrix resized for an added "<mask>" token is not saved (its new row is
        # drawn from the run's seed again on resume), so a checkpoint loads on the base model as the output does
        self.peft_module.save_pretrained(output_dir, save_embedding_layers=False)
        if self.run_identity is not None and Path(output_dir).resolve() != Path(self.args.output_dir).resolve():
            write_json(Path(output_dir) / RUN_MARKER, self.run_identity)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(resume_from_checkpoint) / "adapter_model.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no adapter_model.safetensors in checkpoint {resume_from_checkpoint}")
        result = set_peft_model_state_dict(self.peft_module, load_file(str(path)))
        bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if bad:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} has adapter keys this model lacks: {bad[:4]}")

    def _load_best_model(self):  # checkpoints are adapters; "best model" tracking is not supported
        logger.warning("load_best_model_at_end is not supported for adapter checkpoints; keeping the last model")


def mixed_precision(dtype) -> dict:
    """The Trainer's autocast for a run's weight dtype (``--dtype``): on CUDA, bf16 autocast for bfloat16 (the
    default), fp16 autocast with loss scaling for float16 (fp16 gradients underflow without it; the LoRA weights
    are fp32, which the scaler needs); none for float32 and on the CPU."""
    cuda = torch.cuda.is_available()
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    return {"bf16": cuda and name in (None, "bfloat16"), "fp16": cuda and name == "float16"}


def training_arguments(output_dir, *, batch_size, grad_accum, learning_rate, max_steps, warmup_steps=0,
                       logging_steps=10, save_steps=200, save_total_limit=None, seed=42, bf16=None, fp16=False,
                       dataloader_num_workers=0, report_to="none", disable_tqdm=None, drop_last=False,
                       weight_decay=0.0, lr_scheduler_type="linear", extra: dict | None = None):
    """TrainingArguments with our conventions: no column pruning (collators take raw examples), adapter
    checkpoints every ``save_steps``, bf16 autocast on CUDA."""
    from transformers import TrainingArguments

    if bf16 is None:
        bf16 = torch.cuda.is_available()
    kw = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        max_steps=max_steps,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_scheduler_type=lr_scheduler_type,
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=fp16,
        remove_unused_columns=False,
        dataloader_num_workers=dataloader_num_workers,
        dataloader_drop_last=drop_last,
        report_to=report_to,
        disable_tqdm=disable_tqdm,
        # accelerate only sets up multi-process CPU training (gloo DDP under torchrun) when told it is CPU-only
        use_cpu=not torch.cuda.is_available(),
        # every trained weight is a LoRA weight that each step uses: DDP need not search the graph for unused
        # ones (the Trainer's default for a wrapper module, with a warning per run and a graph walk per step)
        ddp_find_unused_parameters=False,
    )
    kw.update(extra or {})
    return TrainingArguments(**kw)


def schedule_steps(args, n_examples: int, world: int, drop_last: bool) -> int | None:
    """The learning-rate schedule's length in optimizer steps for ``args.lr_schedule_epochs`` epochs of
    ``n_examples`` (None when it is not set: the schedule spans max_steps), as transformers counts an epoch's steps
    with ``num_train_epochs`` (the original scripts' schedule, which their stop_after_n_steps cuts short)."""
    epochs = getattr(args, "lr_schedule_epochs", None)
    if epochs is None:
        return None
    per_batch = args.batch_size * world
    batches = n_examples // per_batch if drop_last else -(-n_examples // per_batch)
    return max(1, math.ceil(epochs * max(1, batches // args.grad_accum)))


def loss_history(trainer) -> list[dict]:
    """``[{"step": s, "loss": l}, ...]`` from the Trainer's log history."""
    return [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]


class TimeLimit(TrainerCallback):
    """Stops training after ``seconds`` of wall clock (checked at each optimizer step); the run then ends as if
    ``max_steps`` had been reached: the output is saved, ``stopped_at`` holds the last step. The learning-rate
    schedule still runs to ``max_steps``, so a stopped run ends before its decay does."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"max_train_seconds must be > 0, got {seconds}")
        self.seconds, self.start, self.stopped_at = float(seconds), None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None and time.monotonic() - self.start > self.seconds:
            if self.stopped_at is None:
                logger.warning("time limit of %g s reached at step %d of %d: stopping", self.seconds,
                               state.global_step, state.max_steps)
            self.stopped_at = state.global_step
            control.should_training_stop = True


def add_step_callbacks(trainer, max_train_seconds=None):
    """A :class:`StepCounter`, with ``max_train_seconds`` a :class:`TimeLimit`, and (an :class:`AdapterTrainer`) a
    :class:`FiniteLossGuard` on ``trainer``."""
    counter = StepCounter()
    trainer.add_callback(counter)
    limit = TimeLimit(max_train_seconds) if max_train_seconds else None
    if limit is not None:
        trainer.add_callback(limit)
    trainer.add_callback(LogWhereItCounts())  # after the stop decisions above, before the guard reads should_log
    if isinstance(trainer, AdapterTrainer):
        trainer.add_callback(FiniteLossGuard(trainer))  # last: it sees the stop and save decisions of the others
    return counter, limit


class LogWhereItCounts(TrainerCallback):
    """Logs the loss at every step where the run saves, evaluates or stops, besides every ``logging_steps``.

    The Trainer's log holds the mean loss since the previous log; steps after the last log appear nowhere (its own
    ``train_loss`` covers only the steps of the process that ran them). Logging where a checkpoint is written makes a
    resumed run's history cover every step up to it, and logging at the last step covers the rest, so the logged
    losses, weighted by their step counts, are the mean of the whole run (the result line's ``mean_train_loss``).
    Evaluation steps are logged too: an early stop happens at one of them.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or control.should_evaluate or control.should_training_stop \
                or state.global_step >= state.max_steps:
            control.should_log = True


class FiniteLossGuard(TrainerCallback):
    """Stops a run whose loss is no longer finite, before it saves or evaluates anything more.

    Hugging Face's Trainer keeps training through a NaN or infinite loss: its log replaces such a step's loss with
    the running mean (``logging_nan_inf_filter``), and the optimizer carries the NaN into the adapter, which is then
    saved as if nothing had happened. :class:`AdapterTrainer` marks every micro-step whose loss is not finite in a
    device flag (no synchronisation); this callback reads the flag where the Trainer is about to log or save (which
    reads the device anyway), at the last step and at the end of training, and raises ``FloatingPointError``
    naming the steps. Checkpoints already written stay; the NaN one and the final output are never written.
    """

    def __init__(self, trainer):
        self.trainer, self.checked_at = trainer, None

    def check(self, state, where):
        """Raise ``FloatingPointError`` when a loss since the last check was not finite (``where`` names the
        check in the message)."""
        if not self.trainer.take_nonfinite_loss():
            self.checked_at = state.global_step
            return
        since = "the start" if self.checked_at is None else f"step {self.checked_at}"
        raise FloatingPointError(
            f"the training loss was NaN or infinite in a step after {since} (checked {where}, optimizer step "
            f"{state.global_step} of {state.max_steps}); stopped without saving it. Checkpoints written before "
            "are intact. Try a lower learning rate, float32 weights (--dtype float32) or gradient clipping "
            "(max_grad_norm).")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save or control.should_training_stop or \
                state.global_step >= state.max_steps:
            self.check(state, "before the step's log or save")

    def on_train_end(self, args, state, control, **kwargs):
        self.check(state, "at the end of training")


class StepCounter(TrainerCallback):
    """Counts the optimizer steps this process ran (a resumed run starts counting at the checkpoint)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
