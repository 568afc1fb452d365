"""Partial gradient checkpointing: the first k decoder layers recompute, the rest keep their activations."""
import copy

import pytest
import torch

from llm2vec_fast.training.common import enable_checkpointing

from .test_lora import _pair, _run, _saved_bytes


def test_partial_checkpointing_keeps_gradients_and_sits_between_none_and_all():
    _, none = _pair(0.1)
    models = {"none": none}
    for name, k in (("first", 1), ("all", True)):
        m = copy.deepcopy(none)
        assert enable_checkpointing(m, k) == (2 if k is True else 1)
        models[name] = m
    blocks = [b.gradient_checkpointing for b in models["first"].base_model.model.layers]
    assert blocks == [True, False]
    ref = _run(models["none"])
    for k in ("first", "all"):
        out = _run(models[k])
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # the same dropout draws, replayed
        for name in ref[2]:
            torch.testing.assert_close(out[2][name], ref[2][name], rtol=1e-6, atol=1e-7, msg=name)
    kept = {k: _saved_bytes(m) for k, m in models.items()}
    assert kept["all"] < kept["first"] < kept["none"]


def test_checkpoint_layer_counts():
    from llm2vec_fast.training.common import _checkpointed_count

    assert _checkpointed_count(True, 24) == 24
    assert _checkpointed_count(False, 24) == 0
    assert _checkpointed_count(0.5, 24) == 12
    assert _checkpointed_count(0.3, 24) == 8  # rounded up
    with pytest.raises(ValueError, match="30 layers asked, the model has 24 decoder layers"):
        _checkpointed_count(30, 24)
    with pytest.raises(ValueError, match="in \\(0, 1\\], got 1.5"):
        _checkpointed_count(1.5, 24)
    with pytest.raises(ValueError, match=">= 0, got -1"):
        _checkpointed_count(-1, 24)
    with pytest.raises(TypeError, match="'half'"):
        _checkpointed_count("half", 24)


def test_cli_gradient_checkpointing_values():
    import argparse

    from llm2vec_fast.training.cli import _ckpt

    assert _ckpt(None) is False and _ckpt("all") is True and _ckpt(True) is True
    assert _ckpt("16") == 16 and _ckpt("0.5") == 0.5
    for bad in ("many", "0", "0.0", "1.5", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"a layer count >= 1, a fraction in \\(0, 1\\] or all, "
                                                             f"got '{bad}'"):
            _ckpt(bad)


def test_partial_checkpointing_needs_decoder_layers():
    with pytest.raises(ValueError, match=r"checkpointing part of the layers \(2\) needs decoder layers"):
        enable_checkpointing(torch.nn.Linear(2, 2), 2)
    assert enable_checkpointing(torch.nn.Linear(2, 2), False) == 0
