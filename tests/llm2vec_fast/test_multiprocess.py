"""Data-parallel encoding (two CPU worker processes stand in for two GPUs): the same rows as one process, in input
order, with instructions, precision and truncation; clear errors; a dead worker fails the call instead of hanging."""
import os
import signal

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec

TEXTS = [f"sentence number {i} " + "word " * (i % 7) for i in range(37)] + ["", "   ", "last one"]


@pytest.fixture(scope="module")
def l2v(tiny_encoder_dir):
    model = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    model.prompts = {"query": "Retrieve passages"}
    return model


@pytest.fixture(scope="module")
def pool(l2v):
    p = l2v.start_multi_process_pool(["cpu", "cpu"], threads_per_worker=1)
    yield p
    l2v.stop_multi_process_pool(p)


def test_pool_equals_single_process(l2v, pool):
    items = TEXTS + [["Retrieve similar text", "a cat sleeps"]]
    expected = l2v.encode(items, show_progress_bar=False)
    got = l2v.encode(items, pool=pool, chunk_size=5, show_progress_bar=False)
    assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-5
    assert got[37:39].abs().max() == 0  # empty texts keep their rows, as zero vectors
    # the older sentence-transformers name, a stored prompt, normalisation
    a = l2v.encode_multi_process(TEXTS[:9], pool, prompt_name="query", normalize_embeddings=True,
                                 show_progress_bar=False)
    b = l2v.encode(TEXTS[:9], prompt_name="query", normalize_embeddings=True, show_progress_bar=False)
    assert (a - b).abs().max() <= 1e-5


def test_pool_precision_and_truncation_use_all_rows(l2v, pool):
    kw = dict(precision="int8", truncate_dim=16, normalize_embeddings=True, show_progress_bar=False)
    got = l2v.encode(TEXTS, pool=pool, chunk_size=4, **kw)
    expected = l2v.encode(TEXTS, **kw)
    assert got.dtype == np.int8 and got.shape == (len(TEXTS), 16)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # bucket edges may differ by rounding


def test_single_string_empty_list_and_reuse(l2v, pool):
    one = l2v.encode("just one", pool=pool, show_progress_bar=False)
    assert one.shape == (64,) and torch.allclose(one, l2v.encode("just one", show_progress_bar=False), atol=1e-5)
    assert l2v.encode([], pool=pool, show_progress_bar=False).shape == (0, 64)


def test_worker_errors_reach_the_caller(l2v, pool):
    pairs = [("", t) for t in TEXTS]
    # an argument only the worker's encode looks at: every chunk fails there, the caller hears which and why
    with pytest.raises(RuntimeError, match=r"4 of 4 chunks failed; first: chunk \d \(inputs [0-9, .]+\) on cpu: "
                                           r"TypeError.*no_such"):
        pool.encode(pairs, chunk_size=10, show_progress_bar=False, no_such_option=1)
    # the pool still works afterwards
    assert l2v.encode(TEXTS[:3], pool=pool, show_progress_bar=False).shape == (3, 64)


def test_bad_arguments(l2v, pool):
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        l2v.start_multi_process_pool([])
    with pytest.raises(ValueError, match="'gpu:7' is not a device"):
        l2v.start_multi_process_pool(["gpu:7"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' does not exist: this machine has 0 CUDA device"):
            l2v.start_multi_process_pool(["cuda:0"])
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        l2v.encode(TEXTS, pool=pool, chunk_size=0, show_progress_bar=False)


def test_device_list_runs_a_pool_for_one_call_and_a_dead_worker_fails_the_call(l2v):
    got = l2v.encode(TEXTS[:6], device=["cpu"], show_progress_bar=False)
    assert (got - l2v.encode(TEXTS[:6], show_progress_bar=False)).abs().max() <= 1e-5
    assert l2v.device.type == "cpu" and next(l2v.model.parameters()).is_shared()
    p = l2v.start_multi_process_pool(["cpu"], threads_per_worker=1)
    os.kill(p._procs[0].pid, signal.SIGKILL)
    p._procs[0].join(10)
    with pytest.raises(RuntimeError, match="encode worker on cpu died"):
        l2v.encode(TEXTS, pool=p, show_progress_bar=False)
    with pytest.raises(RuntimeError, match="pool is closed"):
        l2v.encode(TEXTS, pool=p, show_progress_bar=False)


def test_cli_devices_streams_shards(tiny_encoder_dir, tmp_path, capsys):
    from llm2vec_fast.cli import main

    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i}\n" for i in range(21)))
    common = ["--model", str(tiny_encoder_dir), "--device", "cpu", "--no-progress"]
    assert main(["encode", "-i", str(src), "-o", str(tmp_path / "shards"), "--chunk-size", "8",
                 "--devices", "cpu,cpu", "--worker-load", "reload", *common]) == 0
    assert main(["encode", "-i", str(src), "-o", str(tmp_path / "one.npy"), *common]) == 0
    shards = sorted((tmp_path / "shards").glob("embeddings-*.npy"))
    assert len(shards) == 3
    assert np.allclose(np.concatenate([np.load(s) for s in shards]), np.load(tmp_path / "one.npy"), atol=1e-5)


def test_reload_workers_load_from_the_recorded_arguments(l2v):
    """load="reload": no shared memory; each worker runs from_pretrained with this encoder's arguments and takes its
    settings (here a prompt and a pooling mode changed after loading)."""
    l2v.pooling_mode = "weighted_mean"
    try:
        expected = l2v.encode(TEXTS[:7], prompt_name="query", show_progress_bar=False)
        with l2v.start_multi_process_pool(["cpu"], threads_per_worker=1, load="reload") as p:
            got = l2v.encode(TEXTS[:7], pool=p, prompt_name="query", show_progress_bar=False)
    finally:
        l2v.pooling_mode = "mean"
    assert (got - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="load must be 'share' or 'reload'"):
        l2v.start_multi_process_pool(["cpu"], load="copy")
    bare = LLM2Vec(l2v.model, l2v.tokenizer)
    with pytest.raises(ValueError, match="needs a model built by LLM2Vec.from_pretrained"):
        bare.start_multi_process_pool(["cpu"], load="reload")
