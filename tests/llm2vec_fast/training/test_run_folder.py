"""The output folder of a training run: an earlier run is never silently replaced, resuming takes a complete
checkpoint of the same run, checkpoints hold the adapter only; argument checks found by review."""
import json
import shutil

import pytest

from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive
from llm2vec_fast.training.mntp import MNTPArguments, train_mntp


def _mntp(model_dir, text_file, out, **kw):
    base = dict(train_files=[text_file], output_dir=str(out), model=model_dir, max_seq_length=32, batch_size=4,
                max_steps=4, logging_steps=1, save_steps=2, learning_rate=1e-2, disable_tqdm=True, seed=3)
    base.update(kw)
    return MNTPArguments(**base)


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "run"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, out))
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds an earlier run \(checkpoint-2, checkpoint-4, adapter_model"
                                         r"\.safetensors, llm2vec_training\.json\): resume it \(--resume\), start "
                                         r"afresh there \(--overwrite-output-dir"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, learning_rate=1e-5))
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # refused before anything was written
    # afresh: the earlier checkpoints go (a later --resume must not pick them up), the new run's come; an earlier
    # best/ (a result) is set aside even when the new run does not evaluate
    (out / "best").mkdir()
    (out / "best" / "adapter_model.safetensors").write_bytes(adapter)
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=3, save_steps=3, overwrite_output_dir=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"] and r["steps_run"] == 3
    assert (out / "adapter_model.safetensors").read_bytes() != adapter
    assert not (out / "best").exists() and (out / "best.set-aside-1" / "adapter_model.safetensors").read_bytes() \
        == adapter


def test_resume_takes_the_last_complete_checkpoint(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    out = tmp_path / "run"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=2))
    # a run killed while saving checkpoint-4: the adapter is there, the trainer state is not
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-4")
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    with caplog.at_level("WARNING", logger="llm2vec_fast.training.common"):
        r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, resume_from_checkpoint=True))
    assert "skipping" in caplog.text and "checkpoint-4: it was cut short while saving" in caplog.text
    assert r["steps_run"] == 2  # steps 3 and 4, from checkpoint-2
    # named explicitly, an incomplete checkpoint or the output folder itself is refused with what to do instead
    shutil.rmtree(out / "checkpoint-4")
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-9")
    (out / "checkpoint-9" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-9 is not a complete checkpoint .*resume from an earlier one"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, resume_from_checkpoint=str(out / "checkpoint-9")))
    with pytest.raises(ValueError, match="it is a run's output folder; resume without a path takes the last"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, resume_from_checkpoint=str(out)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to resume in .*empty: no complete checkpoint-N folder; run "
                                         "without resume to start afresh"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, empty, resume_from_checkpoint=True))


def test_resume_refuses_a_checkpoint_of_another_stage(tiny_model_dir, tiny_text_file, tiny_sentence_file, tmp_path):
    mntp = tmp_path / "mntp"
    train_mntp(_mntp(tiny_model_dir, tiny_text_file, mntp, max_steps=2))
    marker = json.loads((mntp / "checkpoint-2" / "llm2vec_checkpoint.json").read_text())
    assert {k: marker[k] for k in ("stage", "model", "peft")} == {"stage": "mntp", "model": tiny_model_dir,
                                                                   "peft": None}
    assert marker["learning_rate"] == 1e-2 and marker["lr_schedule_epochs"] is None
    assert not (mntp / "llm2vec_checkpoint.json").exists()  # checkpoints only
    # the same stage with another learning rate: the restored scheduler would ignore it, so it is refused
    with pytest.raises(ValueError, match=r"another run \(learning_rate: 0.01, this run: 0.05\); resume it with its "
                                         r"own arguments"):
        train_mntp(_mntp(tiny_model_dir, tiny_text_file, mntp, max_steps=4, learning_rate=0.05,
                         resume_from_checkpoint=True))
    with pytest.raises(ValueError, match=r"checkpoint-2 is a checkpoint of another run \(stage: 'mntp', this run: "
                                         r"'simcse'"):
        train_contrastive(ContrastiveArguments(
            mode="simcse", train_files=[tiny_sentence_file], output_dir=str(tmp_path / "s"), model=tiny_model_dir,
            batch_size=4, max_steps=4, save_steps=0, resume_from_checkpoint=str(mntp / "checkpoint-2")))


def test_added_mask_token_checkpoints_hold_the_adapter_only(tiny_model_dir, tiny_text_file, tmp_path):
    from safetensors.torch import load_file

    from llm2vec_fast import LLM2Vec

    out = tmp_path / "mm"
    full = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, mask_token="mask", recipe="mistral"))
    ckpt = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert not [k for k in ckpt if "embed_tokens" in k] and ckpt.keys() == load_file(
        str(out / "adapter_model.safetensors")).keys()
    LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out / "checkpoint-2"), device="cpu")
    # the added row is drawn from the seed again: a resumed run continues the same curve
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, resumed, mask_token="mask", recipe="mistral",
                         resume_from_checkpoint=True))
    a = {x["step"]: x["loss"] for x in full["losses"]}
    b = {x["step"]: x["loss"] for x in r["losses"]}
    assert b[3] == pytest.approx(a[3], rel=1e-5) and b[4] == pytest.approx(a[4], rel=1e-5)


@pytest.mark.parametrize("over, message", [
    (dict(mode="supervised", scale=-5.0), "scale must be a finite number > 0 .*got -5.0"),
    (dict(mode="simcse", scale=0.0), "scale must be a finite number > 0"),
    (dict(mode="supervised", scale=float("nan")), "scale must be a finite number > 0 .*got nan"),
    (dict(mode="simcse", batch_size=1), "batch_size 1: SimCSE's negatives are the other sentences"),
    (dict(mode="simcse", save_total_limit=0), r"save_total_limit must be an int >= 1 .*got 0"),
    (dict(mode="simcse", save_total_limit=-1), "save_total_limit must be an int >= 1"),
    (dict(mode="supervised", lora_alpha=0), r"lora_alpha must be a number > 0 \(the adapter's output is scaled"),
    (dict(mode="supervised", instructions=7), None),
])
def test_bad_training_arguments_are_refused(tmp_path, over, message):
    if message is None:
        with pytest.raises(TypeError, match="instructions must be a list .*got int 7"):
            ContrastiveArguments(train_files=["x"], output_dir=str(tmp_path), **over)
        return
    with pytest.raises(ValueError, match=message):
        ContrastiveArguments(train_files=["x"], output_dir=str(tmp_path), **over)


def test_one_file_or_instruction_may_be_given_as_such(tmp_path):
    a = ContrastiveArguments(mode="supervised", train_files="trip.csv", instructions="Retrieve x",
                             output_dir=str(tmp_path))
    assert a.train_files == ["trip.csv"] and a.instructions == ["Retrieve x"]
    m = MNTPArguments(train_files=tmp_path / "wiki.txt", validation_files="v.txt", output_dir=str(tmp_path / "o"))
    assert m.train_files == [tmp_path / "wiki.txt"] and m.validation_files == ["v.txt"]


def test_output_and_peft_paths_are_checked_first(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="output_dir '.*a_file' is a file; give a folder path"):
        ContrastiveArguments(mode="supervised", train_files=["x"], output_dir=str(tmp_path / "a_file"))
    (tmp_path / "out" / "mntp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="model folder 'out/nothere' not found: 'out' is a local folder"):
        ContrastiveArguments(mode="supervised", train_files=["x"], output_dir="o", peft="out/nothere")


def test_lora_targets_the_user_gives_must_exist(tiny_model_dir):
    from transformers import AutoModel

    from llm2vec_fast.training.common import LORA_TARGETS, add_lora

    base = AutoModel.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) 'foo' do not exist in LlamaModel; its linear "
                                         r"layers are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        add_lora(base, targets=("q_proj", "foo"), fused=False)
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) 'foo', 'bar' do not exist"):
        add_lora(base, targets=("foo", "bar"), fused=False)
    # the default list is trimmed to what the family has, silently
    assert add_lora(AutoModel.from_pretrained(tiny_model_dir), targets=LORA_TARGETS, fused=False) is not None


def test_mine_refuses_to_write_over_its_input(tiny_model_dir, tmp_path, capsys):
    from llm2vec_fast.cli import main

    src = tmp_path / "pairs.jsonl"
    src.write_text('{"query": "a", "positive": "b"}\n')
    code = main(["mine", "-i", str(src), "-o", str(src), "--model", tiny_model_dir, "--device", "cpu"])
    assert code == 2 and "would overwrite the --input file" in capsys.readouterr().err
    assert src.read_text() == '{"query": "a", "positive": "b"}\n'


def test_a_mistyped_relative_model_folder_is_named(tmp_path, monkeypatch):
    from llm2vec_fast.models import resolve_model

    (tmp_path / "out" / "mntp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model folder 'out/mnpt' not found: 'out' is a local folder, but "
                                                r"it holds no 'mnpt' \(did you mean 'out/mntp'\?\)"):
        resolve_model("out/mnpt")
    assert resolve_model("org/name") == "org/name"  # no local folder 'org': a hub id


def test_cli_argument_errors_name_the_flags(tmp_path, capsys):
    from llm2vec_fast.cli import main

    f = tmp_path / "s.txt"
    f.write_text("a\nb\n")
    for extra, said in ((["--no-contrast-anchors"], "--no-contrast-anchors given without --guide-model"),
                        (["--gradcache-chunk-size", "0"], "--gradcache-chunk-size must be an int >= 1"),
                        (["--lora-alpha", "0"], "--lora-alpha must be a number > 0"),
                        (["--training-arg", "max_steps=5"], "max_steps has its own flag: use --max-steps"),
                        (["--training-arg", "save_strategy=no"], "save_strategy is set by the trainer itself"),
                        (["--training-arg", "no_such_field=1"], "KEY a transformers TrainingArguments field")):
        try:
            code = main(["train", "supervised", "--train-file", str(f), "--output-dir", str(tmp_path / "o"), *extra])
        except SystemExit as e:  # argparse's own refusal (a flag's type check): usage, then the message
            code = e.code
        assert code == 2 and said in capsys.readouterr().err


def test_result_line_means_the_whole_run_and_says_a_time_stop(tiny_model_dir, tiny_text_file, tmp_path):
    from llm2vec_fast.training.cli import _mean_loss

    # logged losses are means since the previous log: weighted by their step counts, resumed parts included
    r = {"losses": [{"step": 1, "loss": 4.0}, {"step": 4, "loss": 1.0}, {"step": 6, "loss": 2.0}], "train_loss": 9.0}
    assert _mean_loss(r) == pytest.approx((4.0 + 3 * 1.0 + 2 * 2.0) / 6)
    out = tmp_path / "t"
    r = train_mntp(_mntp(tiny_model_dir, tiny_text_file, out, max_steps=10_000, save_steps=0, max_train_seconds=1.0))
    record = json.loads((out / "llm2vec_training.json").read_text())
    assert r["stopped_by_time_at"] == record["stopped_by_time_at"] == r["stopped_at"] < 10_000
    with pytest.raises(ValueError, match=r"lr_scheduler_type='linear' with lr_scheduler_kwargs=\{'min_lr': 0.1\} do "
                                         r"not make a scheduler"):
        _mntp(tiny_model_dir, tiny_text_file, tmp_path / "u", extra_training_args={"lr_scheduler_kwargs":
                                                                                    {"min_lr": 0.1}})


def test_mixed_precision_follows_the_weight_dtype(monkeypatch):
    """bf16 autocast for bf16 weights (the CUDA default), fp16 autocast with loss scaling for fp16 weights (their
    gradients underflow without it), none for fp32 or on the CPU."""
    import torch

    from llm2vec_fast.training.common import mixed_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert mixed_precision(None) == mixed_precision("bfloat16") == {"bf16": True, "fp16": False}
    assert mixed_precision("float16") == mixed_precision(torch.float16) == {"bf16": False, "fp16": True}
    assert mixed_precision("float32") == {"bf16": False, "fp16": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mixed_precision("float16") == mixed_precision(None) == {"bf16": False, "fp16": False}
