"""MNTP driver on a tiny random Llama: resume reproduces the loss curve, outputs load with LLM2Vec, CLI."""
import json
import shutil

import pytest
import torch

from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

from .conftest import poison_call, sentences


def _args(model_dir, text_file, out, **kw):
    base = dict(train_files=[text_file], output_dir=str(out), model=model_dir, max_seq_length=32, batch_size=4,
                max_steps=6, logging_steps=1, save_steps=3, learning_rate=1e-2, disable_tqdm=True, seed=3)
    base.update(kw)
    return MNTPArguments(**base)


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("mntp-straight")
    return out, train_mntp(_args(tiny_model_dir, tiny_text_file, out))


def test_resume_reproduces_loss_curve(straight_run, tiny_model_dir, tiny_text_file, tmp_path):
    out, a = straight_run
    assert [r["step"] for r in a["losses"]] == [1, 2, 3, 4, 5, 6]
    # a run interrupted after step 3: only its checkpoint survives; resuming must give the same steps 4-6
    shutil.copytree(out / "checkpoint-3", tmp_path / "checkpoint-3")
    b = train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path, resume_from_checkpoint=True))
    la = {r["step"]: r["loss"] for r in a["losses"]}
    lb = {r["step"]: r["loss"] for r in b["losses"]}
    assert b["steps_run"] == 3 and sorted(lb) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's log
    for s in (4, 5, 6):
        assert lb[s] == pytest.approx(la[s], rel=1e-5, abs=1e-6), (s, la, lb)
    from safetensors.torch import load_file

    wa, wb = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_logged_losses_cover_every_step_for_the_mean(straight_run, tiny_model_dir, tiny_text_file, tmp_path):
    """Logging every 4 steps of 6 with checkpoints at 3 and 6: the checkpoint steps and the last step are logged too,
    so the result line's mean is the mean of all six steps, in one run and in a run resumed from step 3."""
    from llm2vec_fast.training.cli import _mean_loss

    _, every = straight_run  # the same run, logged at every step
    whole = sum(r["loss"] for r in every["losses"]) / 6
    a = train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path / "a", logging_steps=4))
    assert [r["step"] for r in a["losses"]] == [1, 3, 4, 6]
    assert _mean_loss(a) == pytest.approx(whole, rel=1e-5)
    assert a["train_loss"] == pytest.approx(whole, rel=1e-5)  # the Trainer's own figure, for a run in one piece
    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    b = train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path / "b", logging_steps=4,
                         resume_from_checkpoint=True))
    assert [r["step"] for r in b["losses"]] == [1, 3, 4, 6] and b["steps_run"] == 3
    assert _mean_loss(b) == pytest.approx(whole, rel=1e-5)


def test_output_loads_with_llm2vec(straight_run, tiny_model_dir):
    from llm2vec_fast import LLM2Vec

    out, _ = straight_run
    cfg = json.loads((out / "llm2vec_config.json").read_text())
    assert cfg["pooling_mode"] == "mean" and "bidirectional" not in cfg  # the original's keys only
    assert json.loads((out / "llm2vec_fast_config.json").read_text())["bidirectional"] is True
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    texts = sentences(5, seed=42)
    base = LLM2Vec.from_pretrained(tiny_model_dir, device="cpu").encode(texts, show_progress_bar=False)
    tuned = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(out), device="cpu")
    e1 = tuned.encode(texts, show_progress_bar=False)
    assert (e1 - base).abs().max() > 1e-3  # the trained adapter is applied
    # release layout: the output folder is a base model carrying its adapter
    e2 = LLM2Vec.from_pretrained(str(out), device="cpu").encode(texts, show_progress_bar=False)
    torch.testing.assert_close(e2, e1, rtol=1e-4, atol=1e-5)


def test_trains_towards_lower_loss_with_accumulation(tiny_model_dir, tiny_pattern_file, tmp_path):
    """Mistral recipe, gradient accumulation, checkpointing on, adapter-only output: the loss goes down."""
    r = train_mntp(_args(tiny_model_dir, tiny_pattern_file, tmp_path, recipe="mistral", grad_accum=2, batch_size=2,
                         max_steps=12, save_steps=0, gradient_checkpointing=True, release_layout=False,
                         learning_rate=3e-2, logging_steps=4))
    losses = [x["loss"] for x in r["losses"]]
    assert losses[-1] < losses[0], losses
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "adapter_model.safetensors").exists()


def test_cli_parses_and_runs(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    import argparse

    from llm2vec_fast.training.cli import add_subcommands

    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    for stage in ("mntp", "simcse", "supervised"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", stage, "--help"])
        assert "--output-dir" in capsys.readouterr().out
    a = parser.parse_args(["train", "mntp", "--model", tiny_model_dir, "--train-file", tiny_text_file,
                           "--output-dir", str(tmp_path), "--max-seq-length", "32", "--batch-size", "2",
                           "--max-steps", "2", "--save-steps", "0", "--no-progress", "--adapter-only",
                           "--logging-steps", "1"])
    assert a.func(a) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and report["last_logged_step"] == 2 and report["last_logged_loss"] > 0
    assert report["mean_train_loss"] > 0


def test_time_limit_stops_and_saves(tiny_model_dir, tiny_text_file, tmp_path):
    r = train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path, max_steps=10_000, save_steps=0,
                         max_train_seconds=1.0))
    assert r["stopped_at"] is not None and r["steps_run"] == r["stopped_at"] < 10_000
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "llm2vec_training.json").exists()
    with pytest.raises(ValueError, match="max_train_seconds must be > 0"):
        train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path / "x", max_train_seconds=-1))


def test_added_mask_token_output_loads_on_the_base_model(tiny_model_dir, tiny_text_file, tmp_path):
    """--mask-token mask adds a "<mask>" row for training; the output keeps the base vocabulary, so it loads on the
    unchanged base (both layouts) and a text that spells "<mask>" encodes."""
    from safetensors.torch import load_file

    from llm2vec_fast import LLM2Vec

    train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path, mask_token="mask", max_steps=2, save_steps=0))
    assert not [k for k in load_file(str(tmp_path / "adapter_model.safetensors")) if "embed" in k]
    texts = ["a text that spells <mask> inside", "plain"]
    a = LLM2Vec.from_pretrained(tiny_model_dir, peft_model_name_or_path=str(tmp_path), device="cpu")
    b = LLM2Vec.from_pretrained(str(tmp_path), device="cpu")
    assert len(b.tokenizer) == len(a.tokenizer)
    torch.testing.assert_close(a.encode(texts, show_progress_bar=False), b.encode(texts, show_progress_bar=False),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_packed_forward_equals_the_padded_batch(padded):
    # the [B, L] batch packed into one row (the default with llm2vec_fast attention) gives the loss and adapter
    # gradients of the same batch run as it is; right padding: the padded positions carry no label
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from llm2vec_fast import to_bidirectional
    from llm2vec_fast.training.common import add_lora
    from llm2vec_fast.training.mntp import MNTPModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120)
    lm = to_bidirectional(LlamaForCausalLM(cfg), "torch")
    backbone = add_lora(lm.get_decoder(), r=4, dropout=0.0)
    with torch.no_grad():
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    packed = MNTPModel(backbone, lm.get_output_embeddings())
    dense = copy.deepcopy(packed)
    dense.packed = False
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (3, 11), generator=g)
    labels = torch.where(torch.rand(3, 11, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    mask = None
    if padded:
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[1, 7:] = 0
        mask[2, 4:] = 0
        labels[mask == 0] = -100
    calls = []
    hook = packed.backbone.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape),
                                                     with_kwargs=True)
    losses, grads = [], []
    for m in (packed, dense):
        loss = m(input_ids=ids, labels=labels, attention_mask=mask)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    hook.remove()
    assert calls == [torch.Size([1, int(mask.sum()) if padded else 33])]  # one packed row of the real tokens
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_nan_loss_stops_the_run_before_it_is_saved(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """A NaN loss at step 4 (of 6, checkpoints every 3, no logging in between): checkpoint 3 is written and finite,
    then the run raises at the last step's check, and neither checkpoint 6 nor the final output is written (the
    Trainer alone would log a smoothed loss and save the NaN adapter)."""
    from safetensors.torch import load_file

    from llm2vec_fast.training.mntp import MNTPTrainer

    poison_call(monkeypatch, MNTPTrainer, "compute_loss", at=4)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite in a step after step 3 .*optimizer step 6 of 6"):
        train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path, logging_steps=100))
    weights = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "adapter_model.safetensors").exists()


def test_a_nan_loss_is_caught_at_the_next_log(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from llm2vec_fast.training.mntp import MNTPTrainer

    poison_call(monkeypatch, MNTPTrainer, "compute_loss", factor=float("inf"))
    with pytest.raises(FloatingPointError, match=r"after the start .*optimizer step 1 of 6"):
        train_mntp(_args(tiny_model_dir, tiny_text_file, tmp_path, save_steps=0))
