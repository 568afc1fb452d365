"""How fast the host side of ``LLM2Vec.encode`` feeds a device: tokenization, instruction handling, length sorting,
token-budget batching and packing (``LLM2Vec._packed_batches``), with no model run, on the corpora of
``bench_encode.py``, beside a plain ``tokenizer(texts)`` call on the same texts.

It also runs encode's loop against a stand-in device of a given speed (sleeping ``tokens / rate`` per batch), under
the chunk rule before and after 2026-11-27, to show how long the device waits for the host. The encode pipeline
runs the host side on a background thread while the device computes, so its tokens/s bound what encode can reach:
the 1.3B config at the issue's 60 % MFU needs 0.6 x the dense limit bench_encode reports (about 200k tokens/s on an
H100/H200), the 7B config at 75 % about 40k. Runs anywhere (no GPU, no model weights: a one-layer stand-in model
with the SmolLM2 tokenizer).

    python benchmarks/bench_host_pipeline.py       # ~60 s; writes host_pipeline.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# a stand-in device's speed: the 1.3B config at the 60 % MFU on an H200 (0.6 x 331,864 tokens/s dense limit)
DEVICE_RATE = 200_000


def simulate(l2v, pairs, live, budget, rate):
    """The encode loop against a stand-in device that takes ``tokens / rate`` seconds per batch: batch i starts when
    it is ready and batch i - 1 is done; the loop collects batch i - 1 after launching batch i, as encode does.
    Returns (wall seconds, seconds until the first batch, tokens, batches)."""
    from llm2vec_fast.encoder import _ahead

    t0 = time.perf_counter()
    device_free, pending, first, tokens, batches = t0, None, None, 0, 0
    for _, feats, _ in _ahead(l2v._packed_batches(pairs, live, budget, torch.device("cpu")), depth=2):
        if feats is None:
            continue
        now = time.perf_counter()
        first = first if first is not None else now - t0
        n = feats["input_ids"].numel()
        tokens, batches = tokens + n, batches + 1
        device_free = max(now, device_free) + n / rate
        if pending is not None:
            time.sleep(max(0.0, pending - time.perf_counter()))  # collect the previous batch
        pending = device_free
    time.sleep(max(0.0, (pending or t0) - time.perf_counter()))
    return time.perf_counter() - t0, first, tokens, batches


def run(tok_dir, corpora, budget, repeats):
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from benchmarks.bench_encode import load_corpus
    from llm2vec_fast.encoder import LLM2Vec, _instructed_pairs

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    stand_in = LlamaModel(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=len(tokenizer)))
    l2v = LLM2Vec(stand_in, tokenizer, pooling_mode="mean", max_length=512, doc_max_length=512)
    rows = []
    for corpus in corpora:
        texts = load_corpus(corpus)
        pairs = _instructed_pairs(texts, None)
        live = [i for i, (_, t) in enumerate(pairs) if t.strip()]
        import llm2vec_fast.encoder as enc

        # the host side alone, tokenizing through tokenizer.__call__ (before 2026-11-27) and through the fast
        # tokenizer's Rust backend (encode's default since), alternating so that both see the same machine load
        times, tokens, batches = {False: [], True: []}, 0, 0
        for _ in range(repeats):
            for fast in (False, True):
                enc.FAST_TOKENIZE = fast
                t0 = time.perf_counter()
                tokens = batches = 0
                for _, feats, _ in l2v._packed_batches(pairs, live, budget, torch.device("cpu")):
                    if feats is not None:
                        tokens += feats["input_ids"].numel()
                        batches += 1
                times[fast].append(time.perf_counter() - t0)
        enc.FAST_TOKENIZE = True
        plain = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokenizer(texts, truncation=True, max_length=512)
            plain.append(time.perf_counter() - t0)
        plain_sec = statistics.median(plain)
        for fast in (False, True):
            sec = statistics.median(times[fast])
            mode = "host side alone" + (", Rust backend" if fast else ", tokenizer __call__ (before)")
            rows.append({"corpus": corpus, "mode": mode, "texts": len(texts), "tokens": tokens,
                         "batches": batches, "budget_tokens": budget, "seconds": sec, "tokens_per_s": tokens / sec,
                         "plain_tokenizer_tokens_per_s": tokens / plain_sec, "vs_plain_tokenizer": plain_sec / sec})
            print(rows[-1], flush=True)
        # the whole loop against a stand-in device at the 1.3B config's 60 % MFU rate, under each chunk rule

        for early in (False, True):
            enc._EARLY_PARTIAL = early
            runs = [simulate(l2v, pairs, live, budget, DEVICE_RATE) for _ in range(repeats)]
            wall, first, n, nb = sorted(runs)[len(runs) // 2]
            rows.append({"corpus": corpus, "mode": f"device at {DEVICE_RATE / 1e3:.0f}k tok/s, "
                                                   f"{'early partial chunks' if early else 'chunks wait (before)'}",
                         "texts": len(texts), "tokens": n, "batches": nb, "budget_tokens": budget, "seconds": wall,
                         "tokens_per_s": n / wall, "first_batch_s": first, "device_busy_share": n / DEVICE_RATE / wall})
            print(rows[-1], flush=True)
        enc._EARLY_PARTIAL = True
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: as bench_encode.py)")
    p.add_argument("--budget", type=int, default=65536, help="tokens per batch (encode's default on an H100/H200)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results or $OUT)")
    a = p.parse_args(argv)
    from benchmarks.bench_encode import CORPORA, tokenizer_folder
    from benchmarks.common import write_results

    rows = run(tokenizer_folder(a.tokenizer), CORPORA, a.budget, a.repeats)
    write_results("host_pipeline", rows, out_dir=a.out, title="Encode's host side alone: tokenize, sort, batch, pack",
                  notes=f"Median of {a.repeats} passes over the corpora of bench_encode.py with the SmolLM2 tokenizer, "
                        "no model run. 'host side alone': tokens_per_s bounds encode's throughput when the device is "
                        "faster; vs_plain_tokenizer = the time of one tokenizer(texts) call over this pipeline's time; "
                        "'tokenizer __call__' tokenizes through transformers' call (before 2026-11-27), 'Rust backend' "
                        "through the fast tokenizer's backend directly (the same tokens). "
                        "'device at ...': encode's loop (background tokenization, batch i collected after batch i + 1 "
                        "is launched) against a stand-in device that takes tokens / rate seconds per batch; "
                        "device_busy_share = the device's busy time over the wall time (1 = never waiting for the "
                        "host), first_batch_s = when the device gets its first batch.",
                  columns=["corpus", "mode", "texts", "tokens", "batches", "seconds", "tokens_per_s",
                           "plain_tokenizer_tokens_per_s", "vs_plain_tokenizer", "first_batch_s", "device_busy_share"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
