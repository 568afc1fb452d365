"""HTTP serving throughput: concurrent clients against ``llm2vec-fast serve``, with and without request merging.

Each client sends requests of 1–4 STS-B sentences back to back; all clients start together. Three rows, one run,
same model and texts:

* ``merged``: the server as shipped (the worker takes every waiting request into one packed encode call);
* ``per-request``: the same server limited to one request per encode call (``max_batch_texts=1``), what a server
  without dynamic batching does;
* ``offline``: one ``LLM2Vec.encode`` over all the texts, no HTTP: the ceiling.

Reports texts/s, the ratio to ``per-request``, and request latency (p50 / p95).

    python benchmarks/bench_server.py [--model smollm2] [--clients 16] [--requests 8] [--out benchmarks/results]
"""
import argparse
import json
import random
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DATA, write_results  # noqa: E402


def sts_sentences(n):
    lines = (DATA / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    out = []
    for ln in lines:
        parts = ln.split("\t")
        out += parts[5:7]
    return out[:n]


def run_clients(url, batches_per_client):
    """Send each client's requests back to back, all clients at once; returns (seconds, latencies). Raises if any
    request failed: a throughput over lost requests would be wrong."""
    latencies, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(len(batches_per_client) + 1)

    def client(batches):
        start.wait()
        for texts in batches:
            body = json.dumps({"inputs": texts, "truncate": True}).encode()
            req = urllib.request.Request(url + "/embed", data=body, headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    r.read()
            except OSError as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(b,)) for b in batches_per_client]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(errors) + len(latencies)} requests failed; first: {errors[0]}")
    return time.perf_counter() - t0, latencies


def main(argv=None):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.server import EmbeddingServer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)

    l2v = LLM2Vec.from_pretrained(a.model)
    rng = random.Random(0)
    pool = sts_sentences(4 * a.clients * a.requests)
    batches = [[[pool[rng.randrange(len(pool))] for _ in range(rng.randint(1, 4))] for _ in range(a.requests)]
               for _ in range(a.clients)]
    n_texts = sum(len(b) for c in batches for b in c)
    l2v.encode(pool[:64], show_progress_bar=False)  # warm-up

    rows = []
    t = time.perf_counter()
    l2v.encode([x for c in batches for b in c for x in b], show_progress_bar=False)
    offline = time.perf_counter() - t
    for name, max_texts in (("per-request", 1), ("merged", 4096)):
        with EmbeddingServer(l2v, port=0, max_batch_texts=max_texts).start() as server:
            run_clients(server.url, [[["warm-up text"]]])
            secs, lat = run_clients(server.url, batches)
            stats = dict(server.batcher.stats)
        rows.append({"mode": name, "clients": a.clients, "texts": n_texts, "seconds": round(secs, 2),
                     "texts_per_s": round(n_texts / secs, 1), "encode_calls": stats["batches"] - 1,
                     "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
                     "p95_ms": round(1000 * float(np.percentile(lat, 95)), 1)})
    rows.append({"mode": "offline", "clients": None, "texts": n_texts, "seconds": round(offline, 2),
                 "texts_per_s": round(n_texts / offline, 1), "encode_calls": 1, "p50_ms": None, "p95_ms": None})
    # the headline: merged over per-request; offline is the ceiling, reported as the share the server reaches
    per_request, merged, offline = rows
    merged["x_vs_per_request"] = round(merged["texts_per_s"] / per_request["texts_per_s"], 2)
    merged["share_of_offline"] = round(merged["texts_per_s"] / offline["texts_per_s"], 2)
    dev = str(l2v.device)
    name = a.name or f"server_{'gpu' if dev.startswith('cuda') else 'cpu'}"
    notes = (f"Model: {a.model or 'SmolLM2-135M-Instruct'} on {dev} ({str(next(l2v.model.parameters()).dtype)}); "
             f"{a.clients} concurrent clients × {a.requests} requests of 1–4 STS-B dev sentences, TEI `/embed` "
             "over HTTP/1.1 on localhost. `per-request` is the same server with request merging off.")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    path = write_results(name, rows, a.out, columns=columns,
                         title="HTTP serving: request merging vs one request per encode call", notes=notes)
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
