"""Matryoshka training evidence: the same supervised run (SNLI triplets, SmolLM2-135M-Instruct, bidirectional, mean
pooling) with the plain loss and with ``matryoshka_dims``, scored on STS-B dev at each embedding prefix.

    python benchmarks/bench_matryoshka.py [--steps 250] [--dims 576,256,128,64,32] [--sts-limit 500] [--model M]
    python benchmarks/bench_matryoshka.py --data stsb [--steps 200] [--peft SIMCSE_OUT]  # CoSENT on STS-B train

``--data stsb`` trains on scored pairs (STS-B train, CoSENT) instead of SNLI triplets: a loss that reaches a high
STS-B dev score within a CPU-sized run, so the two losses can be compared at every width.

Start from an MNTP output (``--model``; ``python -m llm2vec_fast.training.evidence`` writes one to
``/tmp/llm2vec_fast_evidence/mntp``), as the supervised evidence did: 250 steps from there reached STS-B dev 70.0.
Shorter runs do not get past chance on this 2-core CPU: 100 steps from that MNTP output and 120 from the base model
ended with the plain loss at ~2.7-3.0 (≈ ln 32, the batch's candidates) and STS-B dev 10.8 and 16.6, too early to
compare the losses (2026-11-27). Each 250-step run takes ~30-50 min here.

Both runs share seed, data order, steps and learning rate; only the loss differs. Each model encodes the STS-B
sentences once and is scored on prefixes of those embeddings (what ``encode(..., truncate_dim=d)`` returns). Writes
``matryoshka_<card>.json`` / ``.md`` under ``--out``. Sized for a CPU; on a GPU raise steps and batch.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    DATA,
    environment,
    training_evidence_parser,
    write_training_evidence,
)


def prefix_scores(model, peft, dims, limit) -> dict:
    """STS-B dev Spearman × 100 at each prefix width of one model's embeddings (encoded once)."""
    import numpy as np

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.evaluation import load_sts, sts_scores

    enc = LLM2Vec.from_pretrained(model, peft_model_name_or_path=peft)
    s1, s2, gold = load_sts(DATA / "stsb" / "sts-dev.csv")
    s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    unique = list(dict.fromkeys(s1 + s2))
    index = {s: i for i, s in enumerate(unique)}
    emb = np.asarray(enc.encode(unique, show_progress_bar=False, convert_to_numpy=True), dtype=np.float32)
    a, b = emb[[index[s] for s in s1]], emb[[index[s] for s in s2]]
    return {d: round(100 * sts_scores(a[:, :d], b[:, :d], gold)["spearman"], 2) for d in dims}


DATA_NAMES = {"snli": "supervised on SNLI dev+test triplets (1 hard negative)",
              "stsb": "train scored (CoSENT) on STS-B train"}


def _stage(data: str) -> dict:
    """The training stage and data of ``--data``."""
    from llm2vec_fast.training.evidence import SNLI_INSTRUCTION

    if data == "stsb":
        return dict(mode="scored", loss="cosent", train_files=[str(DATA / "stsb" / "sts-train.csv")])
    return dict(mode="supervised", train_files=[str(DATA / "snli" / "snli_devtest_triplets.csv")],
                instructions=[SNLI_INSTRUCTION])


def main(argv=None) -> int:
    from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive

    p = training_evidence_parser(__doc__, "/tmp/llm2vec_fast_matryoshka", steps=250, sts_limit=500)
    p.add_argument("--data", default="snli", choices=["snli", "stsb"],
                   help="snli: supervised on SNLI triplets; stsb: scored pairs of STS-B train with CoSENT")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dims", default="576,256,128,64,32", help="Matryoshka prefixes (the first is the full width)")
    a = p.parse_args(argv)
    dims = [int(d) for d in a.dims.split(",")]
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, runs = [], {}
    rows.append({"model": "before training", **{f"d{d}": v for d, v in
                                                          prefix_scores(a.model, a.peft, dims, a.sts_limit).items()}})
    print(rows[-1], flush=True)
    for name, mdims in (("plain loss", None), ("matryoshka loss", dims)):
        folder = work / name.split()[0]
        r = train_contrastive(ContrastiveArguments(
            **_stage(a.data), output_dir=str(folder), model=a.model, peft=a.peft, batch_size=a.batch,
            overwrite_output_dir=True,  # a rerun replaces the work folder's earlier run
            max_length=a.max_length, max_steps=a.steps, learning_rate=a.lr, warmup_steps=max(1, a.steps // 10),
            logging_steps=max(1, a.steps // 20), save_steps=0, disable_tqdm=True, matryoshka_dims=mdims,
            max_train_seconds=a.max_seconds))
        runs[name] = {"steps": r["global_step"], "train_runtime_s": r["train_runtime"], "losses": r["losses"]}
        stage = "supervised" if a.data == "snli" else "CoSENT"
        widths = prefix_scores(str(folder), None, dims, a.sts_limit)  # the output loads alone
        rows.append({"model": f"{stage}, {name}", **{f"d{d}": v for d, v in widths.items()}})
        print(rows[-1], flush=True)
    env = environment()
    card = "gpu" if env["card"].startswith("NVIDIA") else "cpu"
    stem = f"matryoshka_{card}" if a.data == "snli" else f"matryoshka_{a.data}_{card}"
    stem += f"_{a.name}" if a.name else ""
    payload = {"benchmark": "matryoshka", "environment": env, "dims": dims, "rows": rows, "runs": runs,
               "settings": {"steps": a.steps, "batch": a.batch, "max_length": a.max_length, "lr": a.lr,
                            "data": DATA_NAMES[a.data], "sts_pairs": a.sts_limit},
               "total_s": round(time.time() - t0, 1)}
    write_training_evidence(out, stem, payload,
                            f"Matryoshka loss: STS-B dev Spearman × 100 at each embedding prefix ({a.sts_limit} pairs)",
                            a.model, a.peft,
                            f"bidirectional, mean pooling; {DATA_NAMES[a.data]}, {a.steps} steps of batch {a.batch} × "
                            f"{a.max_length} tokens, lr {a.lr}, the same seed and data order for both losses; `dN` = "
                            f"the first N of {dims[0]} dimensions.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
