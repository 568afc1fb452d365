"""``train STAGE --config FILE.json``: the original llm2vec's training config files run with this tool's trainer."""
import json
import math

import pytest

from llm2vec_fast.training.original_config import ConfigError, expand_config

# the keys and values of the original's train_configs/{mntp,simcse,supervised}/*.json (Llama-3 files)
MNTP = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "dataset_name": "wikitext",
        "dataset_config_name": "wikitext-103-raw-v1", "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 32, "gradient_accumulation_steps": 1, "do_train": True, "do_eval": True,
        "max_seq_length": 512, "mask_token_type": "blank", "data_collator_type": "default", "mlm_probability": 0.2,
        "overwrite_output_dir": True, "output_dir": "output/mlm/x", "evaluation_strategy": "steps",
        "eval_steps": 100, "save_steps": 200, "stop_after_n_steps": 1000, "lora_r": 16,
        "gradient_checkpointing": True, "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
SIMCSE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "peft_model_name_or_path": "mntp-adapter",
          "simcse_dropout": 0.3, "bidirectional": True, "pooling_mode": "mean", "dataset_name": "Wiki1M",
          "dataset_file_path": "cache/wiki1m_for_simcse.txt", "remove_unused_columns": False,
          "learning_rate": 3e-5, "loss_scale": 20, "per_device_train_batch_size": 128,
          "gradient_accumulation_steps": 1, "do_train": True, "disable_tqdm": False, "max_seq_length": 128,
          "overwrite_output_dir": True, "output_dir": "output/simcse/x", "logging_steps": 50, "save_steps": 200,
          "save_only_model": True, "stop_after_n_steps": 1000, "lora_r": 16, "gradient_checkpointing": True,
          "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2", "seed": 42}
SUPERVISED = {**{k: v for k, v in SIMCSE.items() if k != "simcse_dropout"}, "dataset_name": "E5",
              "dataset_file_path": "cache/E5-data", "learning_rate": 2e-4, "num_train_epochs": 3,
              "warmup_steps": 300, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 64,
              "max_seq_length": 512, "loss_scale": 50}


def _write(tmp_path, cfg, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _flags(argv):
    """{flag: value or True} of an expanded argv (the last value of a repeated flag)."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            out[a] = argv[i + 1] if has_value else True
            i += 2 if has_value else 1
        else:
            i += 1
    return out


def test_mntp_config_means_the_original_recipe(tmp_path, capsys):
    argv = expand_config(["train", "mntp", "--config", _write(tmp_path, MNTP), "--train-file", "wiki.txt"])
    assert argv[:2] == ["train", "mntp"] and "--config" not in argv
    f = _flags(argv)
    assert f["--model"] == "meta-llama/Meta-Llama-3-8B-Instruct" and f["--output-dir"] == "output/mlm/x"
    assert (f["--batch-size"], f["--max-seq-length"], f["--max-steps"], f["--save-steps"]) == ("32", "512", "1000",
                                                                                                "200")
    assert (f["--lora-r"], f["--lora-alpha"]) == ("16", "32")  # the original scripts: alpha = 2 r
    # mask_token_type applies only to a tokenizer without a mask token of its own (run_mntp): auto, else blank
    assert (f["--mask-token"], f["--recipe"], f["--mlm-probability"]) == ("auto", "llama", "0.2")
    # stop_after_n_steps stops training; the schedule spans num_train_epochs (transformers' default 3) epochs
    assert f["--lr-schedule-epochs"] == "3.0"
    assert f["--gradient-checkpointing"] is True and f["--overwrite-output-dir"] is True
    assert f["--dtype"] == "bfloat16" and f["--eval-steps"] == "100"
    # do_eval without a validation file: the original holds out validation_split_percentage (default 5) %
    assert f["--validation-split-percentage"] == "5.0"
    # keys left out: transformers' defaults as the original ran them, not this tool's
    assert (f["--learning-rate"], f["--logging-steps"], f["--warmup-steps"]) == ("5e-05", "500", "0")
    err = capsys.readouterr().err
    assert "no effect here: attn_implementation, dataset_config_name, do_train, evaluation_strategy" in err


def test_mistral_collator_and_original_defaults(tmp_path):
    cfg = {"model_name_or_path": "m", "train_file": "wiki.txt", "output_dir": "o", "data_collator_type": "all_mask",
           "mask_token_type": "mask"}
    f = _flags(expand_config(["train", "mntp", "--config", _write(tmp_path, cfg)]))
    # every selected token masked, at the original's default probability 0.15 (not our Mistral recipe's 0.8);
    # LoRA r 8 (alpha 16) and 10,000 steps: run_mntp.py's defaults; batch 8: TrainingArguments'
    assert (f["--recipe"], f["--mlm-probability"], f["--mask-token"]) == ("mistral", "0.15", "auto-mask")
    assert (f["--lora-r"], f["--lora-alpha"], f["--max-steps"], f["--batch-size"]) == ("8", "16", "10000", "8")
    assert f["--max-seq-length"] == "1024"  # run_mntp: the tokenizer's length, capped at 1024
    assert "--validation-split-percentage" not in f  # no do_eval: no held-out part
    # a relative train_file is found next to the config file
    (tmp_path / "wiki.txt").write_text("x\n")
    f = _flags(expand_config(["train", "mntp", "--config", _write(tmp_path, cfg)]))
    assert f["--train-file"] == str(tmp_path / "wiki.txt")


def test_command_line_flags_win(tmp_path):
    path = _write(tmp_path, SIMCSE)
    argv = expand_config(["train", "simcse", "--config", path, "--lora-r", "4", "--train-file", "mine.txt",
                          "--batch-size=16"])
    f = _flags(argv)
    assert f["--lora-r"] == "4" and f["--lora-alpha"] == "8"  # the original's 2 r, for the command line's r
    assert argv.count("--train-file") == 1 and f["--train-file"] == "mine.txt"
    assert "--batch-size" not in argv and "--batch-size=16" in argv
    assert (f["--attention-dropout"], f["--scale"], f["--pooling-mode"], f["--peft"]) == ("0.3", "20.0", "mean",
                                                                                          "mntp-adapter")
    assert f["--max-length"] == "128" and f["--learning-rate"] == "3e-05" and f["--seed"] == "42"
    # --config=FILE and --config before the stage's other flags
    assert _flags(expand_config(["train", "simcse", f"--config={path}"]))["--train-file"].endswith(
        "wiki1m_for_simcse.txt")
    # argv of other commands, or of train without --config, come back unchanged
    for argv in (["encode", "train", "--config", path], ["train", "mntp", "--train-file", "a"]):
        assert expand_config(list(argv)) == argv


def test_supervised_e5_folder_needs_its_files_named(tmp_path):
    (tmp_path / "cache" / "E5-data").mkdir(parents=True)
    path = _write(tmp_path, SUPERVISED)
    with pytest.raises(ConfigError, match="dataset_file_path 'cache/E5-data' is a folder .*--train-file"):
        expand_config(["train", "supervised", "--config", path])
    f = _flags(expand_config(["train", "supervised", "--config", path, "--train-file", "nli.jsonl"]))
    assert (f["--batch-size"], f["--learning-rate"], f["--warmup-steps"], f["--scale"]) == ("64", "0.0002", "300",
                                                                                            "50.0")
    assert f["--max-steps"] == "1000" and f["--max-length"] == "512" and f["--lr-schedule-epochs"] == "3.0"


def test_steps_epochs_and_exclusive_flags(tmp_path, capsys):
    base = {"model_name_or_path": "m", "train_file": "w.txt", "output_dir": "o"}
    f = _flags(expand_config(["train", "mntp", "--config", _write(tmp_path, {**base, "max_steps": 20000})]))
    # max_steps sets the schedule (no epochs); the default stop_after_n_steps 10,000 still stops it
    assert f["--max-steps"] == "10000" and "--lr-schedule-epochs" not in f
    assert "the learning-rate schedule here spans the 10000 steps run, the original's all 20000" in \
        capsys.readouterr().err
    f = _flags(expand_config(["train", "mntp", "--config", _write(tmp_path, {**base, "stop_after_n_steps": 50,
                                                                             "num_train_epochs": 1})]))
    assert (f["--max-steps"], f["--lr-schedule-epochs"]) == ("50", "1.0")
    # a command-line --validation-file replaces do_eval's held-out split; --no-* flags undo the config's booleans
    cfg = _write(tmp_path, {**base, "do_eval": True, "overwrite_output_dir": True, "gradient_checkpointing": True})
    argv = expand_config(["train", "mntp", "--config", cfg, "--validation-file", "v.txt",
                          "--no-overwrite-output-dir", "--no-gradient-checkpointing"])
    for flag in ("--validation-split-percentage", "--overwrite-output-dir", "--gradient-checkpointing"):
        assert flag not in argv
    # TrainingArguments fields the original passes through, pass through
    f = _flags(expand_config(["train", "mntp", "--config", _write(tmp_path, {**base, "weight_decay": 0.01,
                                                                             "dataloader_prefetch_factor": 2})]))
    assert f["--training-arg"] == "dataloader_prefetch_factor=2"
    assert 'weight_decay=0.01' in expand_config(["train", "mntp", "--config", _write(tmp_path, {
        **base, "weight_decay": 0.01})])


@pytest.mark.parametrize("stage,cfg,message", [
    ("mntp", {**MNTP, "lora_rank": 8}, "unknown key 'lora_rank' for train mntp: neither a key of the original"),
    ("simcse", {k: v for k, v in SIMCSE.items() if k != "bidirectional"}, "does not set bidirectional, which the "
                                                                           "original reads as false"),
    ("mntp", {**MNTP, "simcse_dropout": 0.3}, "unknown key 'simcse_dropout' for train mntp"),
    ("mntp", MNTP, "dataset_name 'wikitext' .* give --train-file"),
    ("mntp", {**MNTP, "train_file": "w.txt", "lora_r": "16"}, "lora_r must be an integer, got '16'"),
    ("mntp", {**MNTP, "train_file": "w.txt", "gradient_checkpointing": "yes"},
     "gradient_checkpointing must be true or false, got 'yes'"),
    ("mntp", {**MNTP, "train_file": "w.txt", "data_collator_type": "span"}, "data_collator_type must be default "
                                                                            "or all_mask, got 'span'"),
    ("simcse", {**SIMCSE, "bidirectional": False}, "bidirectional false"),
    ("supervised", {**SUPERVISED, "loss_class": "MaxLikelihoodLoss", "dataset_file_path": "f.jsonl"},
     "loss_class 'MaxLikelihoodLoss'"),
])
def test_refusals_name_the_key(tmp_path, stage, cfg, message):
    with pytest.raises(ConfigError, match=message):
        expand_config(["train", stage, "--config", _write(tmp_path, cfg)])


def test_bad_files_and_usage(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        expand_config(["train", "mntp", "--config", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON file"):
        expand_config(["train", "mntp", "--config", str(tmp_path / "bad.json")])
    with pytest.raises(ConfigError, match="expected a JSON object of settings, got list"):
        expand_config(["train", "mntp", "--config", _write(tmp_path, [1, 2])])
    with pytest.raises(ConfigError, match="not train scored"):
        expand_config(["train", "scored", "--config", _write(tmp_path, {})])
    with pytest.raises(ConfigError, match="more than once"):
        expand_config(["train", "mntp", "--config", "a.json", "--config", "b.json"])
    with pytest.raises(ConfigError, match="needs a JSON file"):
        expand_config(["train", "mntp", "--config"])
    with pytest.raises(ConfigError, match="--config needs a stage"):
        expand_config(["train", "--config", "a.json"])
    # before the stage name works too: the file is not taken for the stage
    path = _write(tmp_path, {"model_name_or_path": "m", "train_file": "w.txt", "output_dir": "o"})
    assert expand_config(["train", "--config", path, "mntp"])[:2] == ["train", "mntp"]


def test_cli_runs_a_config(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    """The whole way: an original-style MNTP config (with a local train_file) trains, the command line overriding
    its steps and length; a bad config is one error line with exit status 2."""
    from llm2vec_fast.cli import main

    out = tmp_path / "out"
    cfg = {"model_name_or_path": tiny_model_dir, "train_file": tiny_text_file, "output_dir": str(out),
           "per_device_train_batch_size": 2, "max_seq_length": 512, "mask_token_type": "blank",
           "data_collator_type": "all_mask", "mlm_probability": 0.5, "stop_after_n_steps": 1000, "lora_r": 4,
           "save_steps": 0, "learning_rate": 1e-3, "torch_dtype": "float32", "disable_tqdm": True,
           "attn_implementation": "sdpa"}
    path = _write(tmp_path, cfg)
    assert main(["train", "mntp", "--config", path, "--max-steps", "2", "--max-seq-length", "32",
                 "--adapter-only"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    args = json.loads((out / "llm2vec_training.json").read_text())["arguments"]
    assert (args["recipe"], args["mlm_probability"], args["batch_size"], args["max_seq_length"]) == ("mistral", 0.5,
                                                                                                     2, 32)
    assert args["learning_rate"] == 1e-3 and args["max_steps"] == 2 and args["lr_schedule_epochs"] == 3.0
    # the schedule spans 3 epochs of the blocks, so after 2 steps the learning rate has hardly decayed
    state = json.loads((out / "llm2vec_training.json").read_text())
    assert state["arguments"]["mask_token"] == "auto"
    assert main(["train", "mntp", "--config", _write(tmp_path, {**cfg, "lora_rank": 4}, "bad.json")]) == 2
    assert "llm2vec-fast: error: unknown key 'lora_rank'" in capsys.readouterr().err


def test_lr_schedule_epochs_sets_the_schedule_and_bounds_the_run(tiny_model_dir, tiny_text_file, tmp_path):
    """lr_schedule_epochs: the schedule decays over that many epochs (as the original's num_train_epochs), and a run
    whose data ends first stops there, as the original's does."""
    from llm2vec_fast.training.common import schedule_steps
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    a = MNTPArguments(train_files=[tiny_text_file], output_dir=str(tmp_path / "a"), model=tiny_model_dir,
                      max_seq_length=32, batch_size=4, max_steps=1000, save_steps=0, logging_steps=1,
                      disable_tqdm=True, lr_schedule_epochs=0.5, learning_rate=1e-3)
    r = train_mntp(a)
    blocks = r["blocks"]
    assert r["global_step"] == schedule_steps(a, blocks, 1, drop_last=False) == math.ceil(math.ceil(blocks / 4) / 2)
    assert schedule_steps(a, 100, 2, drop_last=True) == 6  # 100 // 8 = 12 batches, half an epoch
    with pytest.raises(ValueError, match="lr_schedule_epochs must be a number > 0"):
        MNTPArguments(train_files=["x"], output_dir=str(tmp_path / "b"), lr_schedule_epochs=0)
