"""CPU encode with glibc's thresholds raised (``llm2vec_fast.cpu_memory``, the default) against glibc's defaults
(``LLM2VEC_FAST_CPU_MALLOC=0``), SmolLM2-135M-Instruct on WikiText-2 paragraphs and wiki1m sentences.

The thresholds are process-wide, so each contender runs in its own process: one worker per (setting, corpus)
loads the model, warms up on a few texts, then times ``encode`` on the same texts ``--repeats`` times. Rounds
alternate the two settings so that load on a shared machine hits both alike. Reports tokens/s (best and median of
the passes), the ratio, and the worker's peak resident memory (``ru_maxrss``).

    python benchmarks/bench_cpu_memory.py                 # ~15 min on 2 cores; writes cpu_memory.{json,md}
    python benchmarks/bench_cpu_memory.py --texts 16 --rounds 1   # a quick look (no full batch)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first texts of each corpus: about 21k and 18k tokens, so that a pass runs one full default CPU batch (32 x 512
# tokens), whose activations (a [16k, 1536] float32 MLP activation is 100 MB) are where glibc's mmap costs show
TEXTS = {"wikitext": 160, "wiki1m": 640}
SETTINGS = {"raised (default)": "1", "glibc defaults (LLM2VEC_FAST_CPU_MALLOC=0)": "0"}


def worker(corpus: str, texts: int, repeats: int, threads: int) -> dict:
    """One process's measurement: encode ``texts`` texts of ``corpus`` ``repeats`` times."""
    import resource
    import time

    import torch

    from benchmarks.bench_encode import load_corpus
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cpu_memory import keep_freed_memory

    torch.set_num_threads(threads)
    l2v = LLM2Vec.from_pretrained("smollm2", pooling_mode="mean", device="cpu", dtype=torch.float32)
    items = load_corpus(corpus, limit=texts)
    l2v.encode(items[:4], show_progress_bar=False)
    tokens = sum(len(x) for x in l2v.tokenize_items([["", t] for t in items])[0])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        l2v.encode(items, show_progress_bar=False)
        times.append(time.perf_counter() - t)
    return {"tokens": tokens, "times": times, "raised": keep_freed_memory(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_worker(setting: str, corpus: str, args) -> dict:
    env = {**os.environ, "LLM2VEC_FAST_CPU_MALLOC": SETTINGS[setting]}
    texts = args.texts or TEXTS[corpus]
    cmd = [sys.executable, __file__, "--worker", corpus, "--texts", str(texts), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {setting!r} on {corpus} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default="wikitext,wiki1m")
    p.add_argument("--texts", type=int, default=None,
                   help="texts per corpus (first N; default: enough for a full 16k-token CPU batch and a part: "
                        f"{TEXTS})")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each running both settings once per corpus")
    p.add_argument("--repeats", type=int, default=1, help="timed encodes per worker")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--worker", metavar="CORPUS", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.texts, args.repeats, args.threads)))
        return

    from benchmarks.common import write_results

    runs = {}
    for r in range(args.rounds):
        order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
        for corpus in args.corpora.split(","):
            for setting in order:
                res = run_worker(setting, corpus, args)
                runs.setdefault((corpus, setting), []).append(res)
                print(f"round {r + 1} {corpus} {setting}: {res['tokens'] / min(res['times']):.0f} tok/s", flush=True)
    rows = []
    for corpus in args.corpora.split(","):
        base = None
        for setting in SETTINGS:
            got = runs[(corpus, setting)]
            tokens = got[0]["tokens"]
            rates = [tokens / t for g in got for t in g["times"]]
            row = {"corpus": corpus, "setting": setting, "texts": args.texts or TEXTS[corpus], "tokens": tokens,
                   "tokens_per_s": max(rates), "median_tokens_per_s": statistics.median(rates),
                   "peak_rss_gib": max(g["peak_rss_gib"] for g in got), "thresholds_raised": got[0]["raised"]}
            rows.append(row)
            if setting.startswith("glibc"):
                base = row
        for row in rows:
            if row["corpus"] == corpus:
                row["x_vs_glibc_defaults"] = row["tokens_per_s"] / base["tokens_per_s"]
    notes = (f"SmolLM2-135M-Instruct, float32, the first texts of each corpus (default budget: 16,384 tokens per "
             f"packed batch), {args.threads} threads; "
             f"{args.rounds} round(s) alternating the settings, {args.repeats} timed encode(s) per process after a "
             "4-text warm-up; tokens/s is the best pass, the median beside it. peak_rss_gib: the worker process's "
             "peak resident memory (model included).")
    path = write_results("cpu_memory", rows, out_dir=args.out, title="CPU encode: glibc thresholds raised vs "
                         "glibc's defaults", notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
