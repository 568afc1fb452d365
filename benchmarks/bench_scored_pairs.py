"""Scored-pair training evidence: ``train scored`` on the STS-B train split with each loss (CoSENT, AnglE, cosine
MSE), scored on STS-B dev (in domain) and SICK trial (another STS set, never trained on).

    python benchmarks/bench_scored_pairs.py [--steps 200] [--losses cosent,angle,cosine] [--model M] [--peft A]

Every run starts from the same model (default: the embedded SmolLM2-135M-Instruct, made bidirectional, no MNTP;
``--model`` takes an MNTP output, ``--peft`` an adapter merged first, e.g. a SimCSE output: the LLM2Vec chain) with
the same seed, data order, steps and learning rate; only the loss differs. Baselines in the same table: the
starting model, and (without ``--peft``) the base model causal with mean and weighted-mean pooling (the pooling
LLM2Vec compares against). Writes ``scored_pairs_<card>[_<name>].json`` / ``.md`` under ``--out``. Sized for a CPU
(SmolLM2, batch 16, 200 steps ≈ 0.56 epoch of STS-B train); on a GPU raise steps and batch.
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


def sts_columns(enc, limit) -> dict:
    """Spearman × 100 on STS-B dev and SICK trial (first ``limit`` pairs of each; None = all)."""
    from llm2vec_fast.evaluation import evaluate_sts

    out = {}
    for name, path in (("STS-B dev", DATA / "stsb" / "sts-dev.csv"), ("SICK trial", DATA / "sick" / "SICK_trial.txt")):
        r = evaluate_sts(enc, str(path), limit=limit)
        (entry,) = next(iter(r["scores"].values()))
        out[name] = round(100 * entry["main_score"], 2)
    return out


def main(argv=None) -> int:
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive

    p = training_evidence_parser(__doc__, "/tmp/llm2vec_fast_scored", steps=200, sts_limit=None)
    p.add_argument("--losses", default="cosent,angle,cosine")
    p.add_argument("--no-baselines", action="store_true", help="skip the untrained rows")
    a = p.parse_args(argv)
    losses = [x.strip() for x in a.losses.split(",") if x.strip()]
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, runs = [], {}
    if not a.no_baselines:
        start = [("untrained, bidirectional, mean", {})] if a.peft is None else \
            [(f"start: {Path(a.peft).name} merged, bidirectional, mean", dict(peft_model_name_or_path=a.peft))]
        causal = [] if a.peft else [("untrained, causal, mean", dict(enable_bidirectional=False)),
                                    ("untrained, causal, weighted mean", dict(enable_bidirectional=False,
                                                                              pooling_mode="weighted_mean"))]
        for label, kw in start + causal:
            rows.append({"model": label, **sts_columns(LLM2Vec.from_pretrained(a.model, **kw), a.sts_limit)})
            print(rows[-1], flush=True)
    train = DATA / "stsb" / "sts-train.csv"
    for loss in losses:
        folder = work / loss
        r = train_contrastive(ContrastiveArguments(
            mode="scored", loss=loss, train_files=[str(train)], output_dir=str(folder), model=a.model, peft=a.peft,
            overwrite_output_dir=True,  # a rerun replaces the work folder's earlier run
            batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr, warmup_steps=max(1, a.steps // 10),
            logging_steps=max(1, a.steps // 20), save_steps=0, disable_tqdm=True, max_train_seconds=a.max_seconds))
        runs[loss] = {"steps": r["global_step"], "train_runtime_s": r["train_runtime"], "losses": r["losses"]}
        enc = LLM2Vec.from_pretrained(str(folder))  # the output loads alone (its base and merged adapter recorded)
        rows.append({"model": f"train scored --loss {loss}", **sts_columns(enc, a.sts_limit)})
        print(rows[-1], flush=True)
    env = environment()
    stem = f"scored_pairs_{'gpu' if env['card'].startswith('NVIDIA') else 'cpu'}" + (f"_{a.name}" if a.name else "")
    pairs = "all pairs" if a.sts_limit is None else f"first {a.sts_limit} pairs of each"
    payload = {"benchmark": "scored_pairs", "environment": env, "rows": rows, "runs": runs,
               "settings": {"steps": a.steps, "batch": a.batch, "lr": a.lr, "data": "STS-B train (5,749 pairs)",
                            "model": a.model or "SmolLM2-135M-Instruct", "peft": a.peft, "sts_pairs": a.sts_limit},
               "total_s": round(time.time() - t0, 1)}
    write_training_evidence(out, stem, payload,
                            f"Training on scored pairs: Spearman × 100 of cosine similarity ({pairs})", a.model, a.peft,
                            f"mean pooling unless named; `train scored` on STS-B train: {a.steps} steps of batch "
                            f"{a.batch}, lr {a.lr}, LoRA r 16, the same seed and data order for every loss. SICK trial "
                            "is another STS set, not trained on.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
