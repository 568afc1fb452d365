"""``train STAGE --config FILE.json``: run a training config file of the original llm2vec (its ``train_configs/mntp``,
``simcse`` and ``supervised`` JSON files, read by ``experiments/run_*.py``) with this tool's trainer.

The file's keys become command-line flags placed before the user's own, so a flag given on the command line wins.
Keys the file leaves out take the original scripts' defaults where they differ from ours (e.g. LoRA r 8, 15 %
masking, 10,000 steps, transformers' learning rate 5e-5 and batch 8), so a file means what it meant there. Keys
that only steer the original's Hugging Face machinery (logging directories, evaluation batch size, attention
implementation, ...) have no effect here and are listed on stderr; a key this module does not know, or a value it
cannot honour, is refused with its name."""
from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("mntp", "simcse", "supervised")

# keys that configure the original's own machinery and mean nothing here (named on stderr when present)
_NO_EFFECT = {
    "per_device_eval_batch_size", "evaluation_strategy", "eval_strategy", "remove_unused_columns", "save_only_model",
    "attn_implementation", "overwrite_cache", "preprocessing_num_workers", "use_fast_tokenizer", "model_revision",
    "cache_dir", "report_to", "logging_dir", "run_name", "dataloader_num_workers", "dataloader_pin_memory",
    "ddp_find_unused_parameters", "find_unused_parameters", "low_cpu_mem_usage", "experiment_id", "token",
    "use_auth_token", "trust_remote_code", "do_train", "streaming", "pad_to_max_length", "dataset_config_name",
    "bf16", "fp16", "tf32", "optim", "logging_first_step", "push_to_hub", "hub_model_id", "log_level",
}

# the original scripts' defaults (their dataclasses and transformers' TrainingArguments) where ours differ; applied
# when the file leaves the key out
_ORIGINAL_DEFAULTS = {
    # max_seq_length: run_mntp caps the tokenizer's model_max_length at 1024 (these tokenizers' are longer); the
    # contrastive scripts leave it to LLM2Vec's own default, 512
    "mntp": {"lora_r": 8, "mlm_probability": 0.15, "stop_after_n_steps": 10000, "learning_rate": 5e-5,
             "per_device_train_batch_size": 8, "warmup_steps": 0, "logging_steps": 500, "save_steps": 500,
             "max_seq_length": 1024, "num_train_epochs": 3.0},
    "simcse": {"lora_r": 8, "simcse_dropout": 0.1, "loss_scale": 50.0, "stop_after_n_steps": 10000,
               "learning_rate": 5e-5, "per_device_train_batch_size": 8, "warmup_steps": 0, "logging_steps": 500,
               "save_steps": 500, "max_seq_length": 512, "num_train_epochs": 3.0},
    "supervised": {"lora_r": 8, "loss_scale": 50.0, "stop_after_n_steps": 10000, "learning_rate": 5e-5,
                   "per_device_train_batch_size": 8, "warmup_steps": 0, "logging_steps": 500, "save_steps": 500,
                   "max_seq_length": 512, "num_train_epochs": 3.0},
}


class ConfigError(ValueError):
    """A config file this tool cannot run as the original would; the message names the key and value."""


def _flag(name, value):
    return [(name, None if value is None else str(value))]


def _bool(key, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _number(key, value, kind=float):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _text(key, value):
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _translate(stage: str, cfg: dict, given: set, base: Path) -> tuple[list, list[str], list[tuple[str, str]]]:
    """(flags, keys without effect, needs): the flags the config ``cfg`` (the file's keys, then the defaults) means
    for ``stage``, in key order; ``needs``: (flag, why) for what the file cannot say and the command line must
    (``given``: the file's own keys)."""
    flags, inert, needs, notes = [], [], [], []

    def path(key):
        p = Path(_text(key, cfg[key])).expanduser()
        return str(p if p.is_absolute() or p.exists() else (base / p if (base / p).exists() else p))

    from .cli import TRAINING_ARG_FLAGS, TRAINING_ARG_MANAGED

    contrastive = stage != "mntp"
    for key, value in cfg.items():
        if key in _NO_EFFECT:
            inert.append(key)
        elif key == "model_name_or_path":
            flags += _flag("--model", _text(key, value))
        elif key == "peft_model_name_or_path" and contrastive:
            if value is not None:
                flags += _flag("--peft", _text(key, value))
        elif key == "output_dir":
            flags += _flag("--output-dir", _text(key, value))
        elif key == "overwrite_output_dir":
            if _bool(key, value):
                flags += _flag("--overwrite-output-dir", None)
        elif key == "per_device_train_batch_size":
            flags += _flag("--batch-size", _number(key, value, int))
        elif key == "gradient_accumulation_steps":
            flags += _flag("--grad-accum", _number(key, value, int))
        elif key == "learning_rate":
            flags += _flag("--learning-rate", _number(key, value))
        elif key == "warmup_steps":
            flags += _flag("--warmup-steps", _number(key, value, int))
        elif key == "max_seq_length":
            if value is not None:
                flags += _flag("--max-seq-length" if stage == "mntp" else "--max-length", _number(key, value, int))
        elif key in ("stop_after_n_steps", "max_steps", "num_train_epochs"):
            # the original: the schedule spans max_steps when it is set (> 0), else num_train_epochs epochs of the
            # data; stop_after_n_steps (a callback) ends training early without changing the schedule
            if key == "stop_after_n_steps":
                stop = _number(key, value, int)
                hard = _number("max_steps", cfg.get("max_steps", -1), int)
                flags += _flag("--max-steps", min(stop, hard) if hard > 0 else stop)
                if hard <= 0:
                    flags += _flag("--lr-schedule-epochs", _number("num_train_epochs", cfg["num_train_epochs"]))
                elif stop < hard:
                    notes.append(f"max_steps {hard} with stop_after_n_steps {stop}: the learning-rate schedule here "
                                 f"spans the {stop} steps run, the original's all {hard}")
            # max_steps and num_train_epochs: read with stop_after_n_steps (always there: defaulted to 10,000)
        elif key == "save_steps":
            flags += _flag("--save-steps", _number(key, value, int))
        elif key == "save_total_limit":
            if value is not None:
                flags += _flag("--save-total-limit", _number(key, value, int))
        elif key == "logging_steps":
            flags += _flag("--logging-steps", _number(key, value, int))
        elif key == "eval_steps":
            if value is not None:
                flags += _flag("--eval-steps", _number(key, value, int))
        elif key == "seed":
            flags += _flag("--seed", _number(key, value, int))
        elif key == "gradient_checkpointing":
            if _bool(key, value):
                flags += _flag("--gradient-checkpointing", None)
        elif key == "torch_dtype":
            if value not in ("auto", None, "bfloat16", "float16", "float32"):
                raise ConfigError(f"torch_dtype must be auto, bfloat16, float16 or float32, got {value!r}")
            if value not in ("auto", None):
                flags += _flag("--dtype", value)
        elif key == "lora_r":
            r = _number(key, value, int)
            flags += _flag("--lora-r", r) + _flag("--lora-alpha", 2 * r)  # the original scripts: alpha = 2 r
        elif key == "lora_dropout":
            flags += _flag("--lora-dropout", _number(key, value))
        elif key == "disable_tqdm":
            if _bool(key, value):
                flags += _flag("--no-progress", None)
        elif key == "mask_token_type" and stage == "mntp":
            if value not in ("blank", "eos", "mask"):
                raise ConfigError(f"mask_token_type must be blank, eos or mask, got {value!r}")
            # run_mntp applies it only to a tokenizer without a mask token of its own
            flags += _flag("--mask-token", {"blank": "auto", "eos": "auto-eos", "mask": "auto-mask"}[value])
        elif key == "data_collator_type" and stage == "mntp":
            if value not in ("default", "all_mask"):
                raise ConfigError(f"data_collator_type must be default or all_mask, got {value!r}")
            # default: 80 % mask / 10 % random / 10 % kept; all_mask: every selected token masked (the recipes'
            # probabilities come from mlm_probability, given or defaulted below)
            flags += _flag("--recipe", "llama" if value == "default" else "mistral")
        elif key == "mlm_probability" and stage == "mntp":
            flags += _flag("--mlm-probability", _number(key, value))
        elif key == "train_file" and stage == "mntp":
            if value is not None:
                flags += _flag("--train-file", path(key))
        elif key == "validation_file" and stage == "mntp":
            if value is not None:
                flags += _flag("--validation-file", path(key))
        elif key == "validation_split_percentage" and stage == "mntp":
            pass  # read with do_eval below
        elif key == "do_eval":
            if contrastive:
                inert.append(key)  # MNTP: read below
        elif key == "max_train_samples":
            if stage != "mntp":
                inert.append(key)  # run_simcse / run_supervised never read it ("TODO: implement this")
            elif value is not None:
                flags += _flag("--max-blocks", _number(key, value, int))
        elif key == "max_eval_samples" and stage == "mntp":
            if value is not None:
                flags += _flag("--max-eval-blocks", _number(key, value, int))
        elif key == "dataset_name":
            if value is not None and not ("dataset_file_path" in cfg and contrastive and value == _DATASET[stage]):
                needs.append(("--train-file", f"dataset_name {value!r} is a dataset the original downloads or lays "
                                              f"out itself; this tool reads local files: give --train-file"))
        elif key == "dataset_file_path" and contrastive:
            if value is not None:
                p = Path(path(key))
                if p.is_dir():
                    needs.append(("--train-file", f"dataset_file_path {value!r} is a folder (the original's E5 "
                                                  f"layout: a .jsonl per task, with instructions built into its "
                                                  f"loader): give each file with --train-file and its instruction "
                                                  f"with --instruction"))
                else:
                    flags += _flag("--train-file", str(p))
        elif key == "simcse_dropout" and stage == "simcse":
            flags += _flag("--attention-dropout", _number(key, value))
        elif key == "loss_scale" and contrastive:
            flags += _flag("--scale", _number(key, value))
        elif key == "pooling_mode" and contrastive:
            flags += _flag("--pooling-mode", _text(key, value))
        elif key == "bidirectional" and contrastive:
            if not _bool(key, value):
                raise ConfigError("bidirectional false: this tool trains bidirectional encoders only (the "
                                  "LLM2Vec recipe); remove the key or set it to true")
        elif key in ("loss_class", "loss_cls") and contrastive:
            if value != "HardNegativeNLLLoss":
                raise ConfigError(f"{key} {value!r}: this tool's contrastive loss is the original's "
                                  f"HardNegativeNLLLoss (in-batch and hard negatives); remove the key")
        elif key in _training_argument_fields():
            if key in TRAINING_ARG_FLAGS or key in TRAINING_ARG_MANAGED:
                inert.append(key)  # the trainer sets it (or the file's own mapped key does)
            else:
                flags += _flag("--training-arg", f"{key}={json.dumps(value)}")
        else:
            raise ConfigError(f"unknown key {key!r} for train {stage}: neither a key of the original llm2vec's "
                              f"run_{stage}.py nor a transformers TrainingArguments field")
    if stage == "mntp" and cfg.get("do_eval") and "validation_file" not in cfg:
        # the original holds out validation_split_percentage % of the training data (default 5) for evaluation
        pct = _number("validation_split_percentage", cfg.get("validation_split_percentage", 5))
        if pct > 0:
            flags += _flag("--validation-split-percentage", pct)
    elif "validation_split_percentage" in cfg:
        inert.append("validation_split_percentage")
    if contrastive and "bidirectional" not in cfg:
        raise ConfigError("the config does not set bidirectional, which the original reads as false (a causal "
                          "encoder); this tool trains bidirectional encoders (the LLM2Vec recipe): add "
                          '"bidirectional": true')
    return flags, inert, needs, notes


def _training_argument_fields() -> set[str]:
    import dataclasses

    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments)}


_DATASET = {"simcse": "Wiki1M", "supervised": "E5"}


def _with_defaults(stage: str, cfg: dict) -> dict:
    merged = dict(cfg)
    for key, value in _ORIGINAL_DEFAULTS[stage].items():
        if key not in merged:
            merged[key] = value
    return merged


def _option(token: str) -> str | None:
    return token.split("=", 1)[0] if token.startswith("--") else None


# flags of which the command line's one replaces the config's other
_EXCLUSIVE = [("--validation-file", "--validation-split-percentage"),
              ("--gradient-checkpointing", "--no-gradient-checkpointing"),
              ("--overwrite-output-dir", "--no-overwrite-output-dir")]


def expand_config(argv: list[str]) -> list[str]:
    """``argv`` with ``train STAGE --config FILE`` replaced by the flags the file means, before the user's own flags
    (which win: a flag given both ways keeps the command line's value). Other argv come back unchanged."""
    t = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if t is None or argv[t] != "train":
        return argv
    where = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not where:
        return argv
    if len(where) > 1:
        raise ConfigError("--config is given more than once")
    i = where[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            raise ConfigError("--config needs a JSON file")
        file, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        file, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    stage_at = next((j for j in range(t + 1, len(rest)) if not rest[j].startswith("-")), None)
    if stage_at is None:
        raise ConfigError("--config needs a stage: train mntp|simcse|supervised --config FILE.json")
    stage = rest[stage_at]
    if stage not in STAGES:
        raise ConfigError(f"--config reads the original llm2vec's {', '.join(STAGES)} configs, not train {stage}")
    cfg = read_config(file)
    flags, inert, needs, notes = _translate(stage, _with_defaults(stage, cfg), set(cfg),
                                            Path(file).expanduser().resolve().parent)
    given = {_option(a) for a in rest if _option(a)}
    for group in _EXCLUSIVE:
        if given.intersection(group):
            given.update(group)
    if "--lora-r" in given and "--lora-alpha" not in given:
        # the original scripts' alpha is 2 r, for the r the command line gives too
        r = _value_of(rest, "--lora-r")
        flags = [(n, v) for n, v in flags if n != "--lora-alpha"]
        if r is not None and r.isdigit():
            flags.append(("--lora-alpha", str(2 * int(r))))
    tokens = []
    for name, value in flags:
        if name not in given:
            tokens += [name] if value is None else [name, value]
    unmet = [why for flag, why in needs if flag not in given and flag not in tokens]
    if unmet:
        raise ConfigError(f"--config {file}: " + "; ".join(unmet))
    if stage == "supervised" and cfg.get("dataset_name") == "E5" and "--instruction" not in given:
        notes.append("the original's E5 loader puts a task instruction on each query (and on the documents of its "
                     "symmetric tasks); give them with --instruction, once per --train-file (and "
                     "--document-instruction for the symmetric ones)")
    if inert:
        print(f"llm2vec-fast: {file}: no effect here: {', '.join(sorted(set(inert)))}", file=sys.stderr)
    for note in notes:
        print(f"llm2vec-fast: {file}: note: {note}", file=sys.stderr)
    return rest[:stage_at + 1] + tokens + rest[stage_at + 1:]


def _value_of(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``)."""
    value = None
    for j, a in enumerate(argv):
        if a == flag and j + 1 < len(argv):
            value = argv[j + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def read_config(file: str) -> dict:
    """The JSON object in ``file``; ConfigError naming the file when it is missing, not JSON or not an object."""
    p = Path(file).expanduser()
    try:
        cfg = json.loads(p.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"--config {file}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {file}: a folder, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {file}: not a JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--config {file}: expected a JSON object of settings, got {type(cfg).__name__}")
    return cfg
