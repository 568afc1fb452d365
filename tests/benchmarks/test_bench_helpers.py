"""Cheap checks of the benchmark scaffolding: corpora, the transformers-4.44 conversion, the GPU check script."""
import argparse
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from benchmarks import bench_encode, prepare_device
from benchmarks.bench_cpu_vs_llm2vec import stsb_sentences

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.parametrize("corpus, n", [("wikitext", 2183), ("wiki1m", 8000)])
def test_corpus_sizes(data_dir, corpus, n):
    texts = bench_encode.load_corpus(corpus, data_dir)
    assert len(texts) == n
    assert all(t and t == t.strip() for t in texts)
    assert not any(t.startswith("=") for t in texts)  # WikiText headings are left out
    assert bench_encode.load_corpus(corpus, data_dir, limit=5) == texts[:5]


def test_unknown_corpus_names_the_choices(data_dir):
    with pytest.raises(ValueError, match="wikitext"):
        bench_encode.load_corpus("wiki2", data_dir)


def test_stsb_sentences(data_dir):
    s = stsb_sentences(800, data_dir)
    assert len(s) == 800
    assert s[0] == "A man with a hard hat is dancing."


def test_legacy_config_lifts_rope_theta():
    cfg = {"model_type": "llama", "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "dtype": "float32",
           "quantization_config": {"quant_method": "gguf"}, "tie_word_embeddings": True}
    out = prepare_device.legacy_config(cfg)
    assert out["rope_theta"] == 1e5 and out["rope_scaling"] is None
    assert "quantization_config" not in out and "rope_parameters" not in out and "dtype" not in out
    assert out["torch_dtype"] == "float32" and out["tie_word_embeddings"] is True
    with pytest.raises(ValueError, match="rope_theta"):
        prepare_device.legacy_config({"model_type": "llama"})


def test_legacy_tokenizer_json_writes_merges_as_strings():
    tok = {"model": {"type": "BPE", "merges": [["Ġ", "t"], ["a", "b"]]}}
    out = prepare_device.legacy_tokenizer_json(tok)
    assert out["model"]["merges"] == ["Ġ t", "a b"]
    assert tok["model"]["merges"][0] == ["Ġ", "t"]  # input untouched
    with pytest.raises(ValueError, match="merge 0"):
        prepare_device.legacy_tokenizer_json({"model": {"merges": [["a b", "c"]]}})


def test_legacy_tokenizer_config_keeps_special_tokens():
    out = prepare_device.legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend", "eos_token": "<e>",
                                                  "pad_token": None, "backend": "tokenizers"})
    assert out["tokenizer_class"] == "PreTrainedTokenizerFast" and out["eos_token"] == "<e>"
    assert "pad_token" not in out and "backend" not in out
    assert out["model_input_names"] == ["input_ids", "attention_mask"]


def test_bench_encode_cli_hooks():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    bench_encode.add_bench_encode(sub)
    args = ap.parse_args(["encode", "--model", "llama-1.3b", "--budgets", "1024,4096", "--peers", "hf,ours"])
    assert args.model == "llama-1.3b" and args.budgets == [1024, 4096] and callable(args.func)
    with pytest.raises(SystemExit):
        ap.parse_args(["encode", "--peers", "hf,foo"])
    with pytest.raises(SystemExit):
        ap.parse_args(["encode", "--budgets", "0"])


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_runs_every_step_and_packs_results(tmp_path):
    """A dry run with a stand-in python: every step runs or is skipped, failures do not stop it, results come back."""
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-" ]; then cat >/dev/null; echo "FakeCard · torch 0"; exit 0; fi\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi\n'
        'n=$(echo "$*" | md5sum | cut -c1-8); echo "# result $n" >"$OUT/r_$n.md"\n'
        'case "$*" in *pooling_ce.py\\ --check*) echo "FAIL parity"; exit 1;; esac\n'
        'echo "done: $*"\n')
    fake.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=str(fake), GPU_CHECK_BUDGET="68",
               PATH=f"{tmp_path}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.md").read_text()
    assert "FakeCard" in summary
    assert "| pooling_ce --check | FAILED (exit 1) |" in summary and "FAIL parity" in summary
    assert "| encode llama-1.3b (both corpora) | ok |" in summary
    assert "| pooling_ce bench | ok |" in summary  # ran after the failure
    assert "| encode mistral-7b (wikitext) | skipped: budget |" in summary  # under 68 s left < its 70 s minimum
    assert (out / "gpu_check.log").exists()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith(".md") for n in names) >= 6
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files


def _fake_python(tmp_path):
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-" ]; then cat >/dev/null; echo "FakeCard · torch 0"; exit 0; fi\n'
        'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi\n'
        'echo "$* GGUF=$LLM2VEC_FAST_GGUF" >>"$CALLS"\n'
        'echo "# result" >"$OUT/r_$(echo "$*" | md5sum | cut -c1-8).md"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="needs bash, sha256sum")
def test_gpu_evidence_assembles_the_model_and_runs_both_stages(tmp_path):
    """Dry run with a stand-in python and a stand-in GGUF split as prepare_device splits the real one."""
    import hashlib

    parts, gguf = tmp_path / "parts", os.urandom(5000)
    src = tmp_path / "model.gguf"
    src.write_bytes(gguf)
    (tmp_path / "device").mkdir()
    prepare_device.build_model_parts(src, parts / "device-model-a", parts / "device-model-b", tmp_path / "device",
                                     part_a_bytes=3000)
    assert (parts / "device-model-b" / "pylib" / "gguf" / "__init__.py").exists()
    out, work, calls = tmp_path / "out", tmp_path / "work", tmp_path / "calls.txt"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=str(_fake_python(tmp_path)),
               MODEL_PARTS_DIR=str(parts), GGUF_DIR=str(tmp_path / "assembled"), CALLS=str(calls))
    script = ROOT / "benchmarks" / "gpu_evidence.sh"
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assembled = tmp_path / "assembled" / "model.gguf"
    assert hashlib.sha256(assembled.read_bytes()).hexdigest() == hashlib.sha256(gguf).hexdigest()
    lines = [ln for ln in calls.read_text().splitlines() if not ln.startswith("-c import gguf")]
    assert len(lines) == 3 and all(f"GGUF={assembled}" in ln for ln in lines)
    assert "--name training_evidence_gpu_mntp" in lines[1] and "--mntp-steps 1000 --mntp-batch 32" in lines[1]
    assert "--reuse-mntp" in lines[2] and "--simcse-batch 128" in lines[2]
    summary = (out / "summary.md").read_text()
    assert "| assemble model.gguf | ok |" in summary and (out / "gpu_evidence.log").exists()
    # a corrupt part is refused before anything runs
    (parts / "device-model-a" / "part-a.bin").write_bytes(b"x" * 3000)
    calls.unlink()
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and not calls.exists()
    assert "sha256 mismatch" in (out / "summary.md").read_text()


@pytest.mark.triton_cpu  # the Triton backend on CPU tensors
@pytest.mark.parametrize("flag", ["_FORCE_PACK", "_FORCE_MULTI"])
def test_bench_attention_forced_layouts_run_with_their_own_tuning_cache(monkeypatch, flag):
    """bench_attention's A/B variants ("ours_head": per-head rows; "ours_seq": per-sequence tiles): inside, the
    kernels take the forced choice with a tuning cache of their own; after, the flag and the tuner's cache are back
    as they were; the tuned-tile label reads configs."""
    import torch
    import triton
    from llm2vec_fast.kernels import attention as A
    from llm2vec_fast.kernels import flash_attention

    from benchmarks import bench_attention

    kernels = (A._attn_fwd_kernel, A._attn_bwd_dkdv_kernel, A._attn_bwd_dq_kernel)
    before = [k.cache for k in kernels]
    lens = (3, 9)
    cu = torch.tensor([0, 3, 12], dtype=torch.int32)
    q, k, v = torch.randn(12, 4, 32), torch.randn(12, 2, 32), torch.randn(12, 2, 32)
    with bench_attention._forced_layout(flag, False):
        assert getattr(A, flag) is False and all(a.cache is not b for a, b in zip(kernels, before, strict=True))
        inside = flash_attention(q, k, v, cu, max(lens))
    assert getattr(A, flag) is None and all(a.cache is b for a, b in zip(kernels, before, strict=True))
    torch.testing.assert_close(inside, flash_attention(q, k, v, cu, max(lens)))
    best = triton.Config({"BM": 64, "BN": 32, "PACK": True, "MULTI": True}, num_warps=4, num_stages=3)
    monkeypatch.setattr(A._attn_fwd_kernel, "best_config", best, raising=False)
    assert bench_attention._tuned_tiles().startswith("fwd 64x32/4/3+pack+multi")


@pytest.mark.parametrize("mode, launches", [("encode", {"attn_fwd", "rms_norm_fwd", "rope", "silu_mul_fwd"}),
                                            ("train", {"attn_bwd_dq", "dp_fwd", "dp_dx", "dp_dw", "rms_norm_bwd"})])
def test_host_overhead_worker_counts_the_gpu_paths_launches(mode, launches):
    """bench_host_overhead's worker (own process: it stubs the interpreter's launches) sees the fused kernels of the
    GPU code path launched once per layer or more, with no kernel computed."""
    import json
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host_overhead.py"), "--worker", mode, "0",
                          "--steps", "1"], capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    got = {k.removeprefix("_").removesuffix("_kernel"): v for k, v in res["launches"].items()}
    assert launches <= set(got) and all(got[k] >= 24 for k in launches), got
    assert res["ms_per_step"] > 0


def test_training_evidence_helpers():
    """The evidence scripts' shared parser (their own options on top) and run summary lines."""
    from benchmarks.common import training_evidence_parser, training_run_lines

    p = training_evidence_parser("doc", "/tmp/w", steps=200, sts_limit=None)
    p.add_argument("--losses", default="cosent")
    a = p.parse_args(["--peft", "ad", "--name", "x", "--losses", "cosine"])
    assert (a.work, a.steps, a.sts_limit, a.peft, a.name, a.losses, a.lr) == ("/tmp/w", 200, None, "ad", "x",
                                                                               "cosine", 2e-4)
    lines = training_run_lines({"cosent": {"steps": 3, "train_runtime_s": 12.4,
                                           "losses": [{"loss": 18.11, "step": 1}, {"loss": 4.9, "step": 3}]}})
    assert lines == ["\n**cosent**: 3 steps in 12 s; loss 18.110 (step 1) → 4.900 (step 3)\n"]


@pytest.mark.triton_cpu  # the Triton backend on CPU tensors
def test_bench_attention_window_rows(monkeypatch):
    """The local-attention benchmark's rows on tiny shapes (interpreted kernel, CPU timer): every path timed, the
    ratios are the peers' times over the windowed kernel's."""
    import time
    from types import SimpleNamespace

    from benchmarks import bench_attention

    def cpu_time(fn, inputs, do, bwd, warmup, rep):
        import torch

        xs = [x.detach().requires_grad_(bwd) for x in inputs[:3]]
        t0 = time.perf_counter()
        out = fn(*xs, *inputs[3:])
        if bwd:
            torch.autograd.grad(out, xs, do)
        return (time.perf_counter() - t0) * 1e3

    monkeypatch.setattr(bench_attention, "DEVICE", "cpu")
    monkeypatch.setattr(bench_attention, "_time", cpu_time)
    import torch

    monkeypatch.setattr(bench_attention, "DTYPE", torch.float32)
    rows = bench_attention.bench_window(SimpleNamespace(warmup=1, rep=1), cases=((70, 16),), heads=(2, 1, 32),
                                        tokens=140)
    (row,) = rows
    assert row["case"] == "2 x 70, W 16"
    for path in ("full", "window", "torch_band"):
        for kind in ("fwd", "fwd+bwd"):
            assert row[f"{path} {kind} ms"] > 0
    assert row["×full fwd"] == round(row["full fwd ms"] / row["window fwd ms"], 2)
