"""Causal encode (``enable_bidirectional=False``): our packed per-sequence causal path against Hugging Face's own SDPA
path (``attn_implementation="sdpa"``: padded batches with a causal mask), same weights, same sentences, one process.

    python benchmarks/bench_causal_encode.py [--texts 800] [--rounds 3] [--model smollm2]

Passes of the two paths interleave round by round, so load from other processes hits both alike; figures are the
best round's sentences/s with the median beside it, and the per-row cosine of the two paths' embeddings. Writes
``causal_encode.{json,md}`` under ``$OUT`` or benchmarks/results.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import DATA, write_results  # noqa: E402


def sts_sentences(n: int) -> list[str]:
    from llm2vec_fast.evaluation import load_sts

    s1, _, _ = load_sts(DATA / "stsb" / "sts-dev.csv")
    return s1[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=800)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from llm2vec_fast import LLM2Vec

    texts = sts_sentences(a.texts)
    kw = dict(enable_bidirectional=False, device="cpu" if not torch.cuda.is_available() else "cuda")
    paths = {"ours (packed causal)": LLM2Vec.from_pretrained(a.model, **kw),
             "HF SDPA (padded, causal mask)": LLM2Vec.from_pretrained(a.model, attn_implementation="sdpa", **kw)}
    times = {name: [] for name in paths}
    emb = {}
    for m in paths.values():  # warm-up
        m.encode(texts[:64], batch_size=a.batch_size, show_progress_bar=False)
    for _ in range(a.rounds):
        for name, m in paths.items():
            t0 = time.perf_counter()
            emb[name] = m.encode(texts, batch_size=a.batch_size, show_progress_bar=False)
            times[name].append(time.perf_counter() - t0)
    ours, hf = emb.values()
    cos = torch.nn.functional.cosine_similarity(ours, hf, dim=-1)
    rows = []
    for name, ts in times.items():
        rows.append({"path": name, "texts": len(texts), "best_sentences_per_s": round(len(texts) / min(ts), 1),
                     "median_sentences_per_s": round(len(texts) / statistics.median(ts), 1), "rounds": len(ts)})
    rows[0]["vs_hf"] = round(rows[0]["best_sentences_per_s"] / rows[1]["best_sentences_per_s"], 2)
    rows[0]["min_cosine_vs_hf"] = round(float(cos.min()), 8)
    path = write_results("causal_encode", rows, out_dir=a.out, title="Causal encode: packed path against HF's SDPA",
                         notes=f"{len(texts)} STS-B dev sentences (first column), batch size {a.batch_size}, "
                               f"{a.rounds} interleaved rounds, fp32, model {a.model or 'SmolLM2-135M-Instruct'}.")
    for r in rows:
        print(r)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
