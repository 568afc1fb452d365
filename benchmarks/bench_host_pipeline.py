"""How fast the host side of ``LLM2Vec.encode`` feeds a device: tokenization, instruction handling, length sorting,
token-budget batching and packing (``LLM2Vec._packed_batches``), with no model run, on the corpora of
``bench_encode.py``, beside a plain ``tokenizer(texts)`` call on the same texts.

The encode pipeline runs this on a background thread while the device computes, so its tokens/s bound what encode
can reach: the 1.3B config at the issue's 60 % MFU needs 0.6 x the dense limit bench_encode reports (about 200k
tokens/s on an H100/H200), the 7B config at 75 % about 40k. Runs anywhere (no GPU, no model weights: a one-layer
stand-in model with the SmolLM2 tokenizer).

    python benchmarks/bench_host_pipeline.py       # ~10 s; writes host_pipeline.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
        times, tokens, batches = [], 0, 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = batches = 0
            for _, feats, _ in l2v._packed_batches(pairs, live, budget, torch.device("cpu")):
                if feats is not None:
                    tokens += feats["input_ids"].numel()
                    batches += 1
            times.append(time.perf_counter() - t0)
        plain = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokenizer(texts, truncation=True, max_length=512)
            plain.append(time.perf_counter() - t0)
        sec, plain_sec = statistics.median(times), statistics.median(plain)
        rows.append({"corpus": corpus, "texts": len(texts), "tokens": tokens, "batches": batches,
                     "budget_tokens": budget, "seconds": sec, "tokens_per_s": tokens / sec,
                     "plain_tokenizer_tokens_per_s": tokens / plain_sec, "vs_plain_tokenizer": plain_sec / sec})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: as bench_encode.py)")
    p.add_argument("--budget", type=int, default=65536, help="tokens per batch (encode's default on an H100/H200)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results or $OUT)")
    a = p.parse_args(argv)
    from benchmarks.bench_encode import CORPORA, tokenizer_folder
    from benchmarks.common import write_results

    rows = run(tokenizer_folder(a.tokenizer), CORPORA, a.budget, a.repeats)
    write_results("host_pipeline", rows, out_dir=a.out, title="Encode's host side alone: tokenize, sort, batch, pack",
                  notes=f"Median of {a.repeats} passes over the corpora of bench_encode.py with the SmolLM2 tokenizer, "
                        "no model run. tokens_per_s bounds encode's throughput when the device is faster; "
                        "vs_plain_tokenizer = the time of one tokenizer(texts) call over this pipeline's time.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
