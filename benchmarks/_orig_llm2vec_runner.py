"""Time the original ``llm2vec==0.2.3`` encode; runs *inside its own venv* (transformers 4.44), never imported.

Driven by benchmarks/bench_cpu_vs_llm2vec.py through stdin/stdout, so that its passes interleave with ours:

    VENV/bin/python benchmarks/_orig_llm2vec_runner.py --model LEGACY_DIR --sentences S.json --out-dir DIR

It loads the model once (fp32, the library's default attention: sdpa), warms up on ``--warmup`` sentences and
answers ``@@ {"ready": ...}``. Then each stdin line is a command: ``run`` times one full ``LLM2Vec.encode`` pass
over the sentences (model already loaded) and answers ``@@ {"time_s": ...}``; ``save`` writes
``DIR/orig_embeddings.npy`` (float32, input order) and, with ``--conformance``, ``DIR/orig_conformance_mean.npy``;
``quit`` exits. Protocol lines start with ``@@ `` so library chatter on stdout cannot be mistaken for them.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def say(obj):
    print("@@ " + json.dumps(obj), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a transformers-4.44-readable model folder")
    ap.add_argument("--sentences", required=True, type=Path, help="JSON list of strings")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=64, help="sentences encoded once before timing")
    ap.add_argument("--conformance", type=Path, help="inputs.json of ../shared/conformance (mean mode is encoded)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import llm2vec
    import transformers
    from llm2vec import LLM2Vec

    sentences = json.loads(args.sentences.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    l2v = LLM2Vec.from_pretrained(args.model, pooling_mode="mean", max_length=512, doc_max_length=400,
                                  skip_instruction=True, torch_dtype=torch.float32)
    load_s = time.perf_counter() - t0
    l2v.eval()
    emb = None
    with torch.inference_mode():
        l2v.encode(sentences[: args.warmup], batch_size=args.batch_size, show_progress_bar=False)
        say({"ready": True, "n": len(sentences), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
             "load_s": load_s, "attn_implementation": getattr(l2v.model.config, "_attn_implementation", None),
             "versions": {"llm2vec": getattr(llm2vec, "__version__", None) or "0.2.3",
                          "transformers": transformers.__version__, "torch": torch.__version__}})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "run":
                t = time.perf_counter()
                emb = l2v.encode(sentences, batch_size=args.batch_size, show_progress_bar=False,
                                 convert_to_numpy=True)
                say({"time_s": time.perf_counter() - t})
            elif cmd == "save":
                args.out_dir.mkdir(parents=True, exist_ok=True)
                if emb is None:
                    emb = l2v.encode(sentences, batch_size=args.batch_size, show_progress_bar=False,
                                     convert_to_numpy=True)
                np.save(args.out_dir / "orig_embeddings.npy", np.asarray(emb, dtype=np.float32))
                if args.conformance:
                    items = json.loads(args.conformance.read_text(encoding="utf-8"))
                    # 0.2.3 wraps plain strings only when the first item is one: wrap all, as make_reference.py does
                    items = [["", x] if isinstance(x, str) else x for x in items]
                    conf = l2v.encode(items, batch_size=8, show_progress_bar=False, convert_to_numpy=True)
                    np.save(args.out_dir / "orig_conformance_mean.npy", np.asarray(conf, dtype=np.float32))
                say({"saved": str(args.out_dir)})
            elif cmd == "quit":
                break
            elif cmd:
                say({"error": f"unknown command {cmd!r}; expected run, save or quit"})


if __name__ == "__main__":
    main()
