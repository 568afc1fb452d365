"""Reproduce the recorded training evidence: STS-B dev Spearman of SmolLM2-135M-Instruct (mean pooling, cosine)
causal and bidirectional, before and after a short MNTP run, after SimCSE on top (with a curve over its
checkpoints), and optionally after supervised training on SNLI triplets.

    python -m llm2vec_fast.training.evidence --out benchmarks/results [--mntp-steps 150] [--simcse-steps 100]

The recorded CPU run (``benchmarks/results/training_evidence_unsup.md``) used::

    python -m llm2vec_fast.training.evidence --mntp-steps 200 --mntp-batch 4 --mntp-len 128 --mntp-lr 2e-4 \
        --simcse-steps 600 --simcse-batch 16 --simcse-len 64 --simcse-lr 5e-4 --simcse-eval-every 150 \
        --sts-limit 500 --name training_evidence_unsup

and the supervised stage on the same MNTP output: ``--reuse-mntp --skip-base --skip-simcse --supervised-steps N``.
Writes ``<name>.json`` / ``.md`` (and ``<name>_loss.png`` when matplotlib is installed) under ``--out``. The
defaults are sized for a CPU; on a GPU raise the steps and batch sizes towards the recipe.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _shared() -> Path:
    here = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("LLM2VEC_FAST_SHARED", here.parent / "shared"))


# the instruction the original's supervised data (E5 mix) gives SNLI queries
SNLI_INSTRUCTION = "Given a premise, retrieve a hypothesis that is entailed by the premise"


def stsb_spearman(model=None, peft=None, bidirectional=True, pooling="mean", data=None, limit=None) -> float:
    """STS-B dev Spearman (cosine of pooled embeddings)."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.evaluation import evaluate_sts

    enc = LLM2Vec.from_pretrained(model, peft_model_name_or_path=peft, enable_bidirectional=bidirectional,
                                  pooling_mode=pooling)
    res = evaluate_sts(enc, data or _shared() / "data" / "stsb" / "sts-dev.csv", limit=limit)
    return float(next(iter(res["scores"].values()))[0]["main_score"])


def _bench_common():
    """benchmarks/common.py of the source checkout this module runs from (the report's environment block and
    tables). The evidence runs are the project's own records: an installed package, which ships no benchmarks/,
    is refused before any training starts."""
    import sys

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "common.py").is_file():
        raise SystemExit(f"llm2vec_fast.training.evidence writes the project's evidence reports with "
                         f"benchmarks/common.py of a source checkout; none beside {root} (an installed package ships "
                         f"no benchmarks/): run it from a clone of llm2vec_fast")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import benchmarks.common as common

    return common


def write_report(out, rows, runs, t0, model="SmolLM2-135M-Instruct", name="training_evidence") -> dict:
    """JSON + markdown (+ PNG with matplotlib) of what has run so far."""
    common = _bench_common()
    environment, markdown_table = common.environment, common.markdown_table

    env = environment()
    n_pairs = rows[0]["sts_pairs"] if rows else 0
    payload = {"benchmark": "training_evidence", "environment": env, "rows": rows, "runs": runs,
               "total_s": round(time.time() - t0, 1)}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    md = [f"# Training evidence: {model}, STS-B dev Spearman × 100 ({n_pairs} pairs)\n",
          f"{env['card']} · torch {env['torch']} · transformers {env['transformers']} · {env['date']}\n",
          markdown_table(rows)]
    for stage, r in runs.items():
        ls = r["losses"]
        md.append(f"\n**{stage}**: {r['steps']} steps, batch {r['batch']} × {r['seq_len']} tokens, lr {r['lr']}, "
                  f"{r['data']}, {_runtime(r)}; loss {ls[0]['loss']:.3f} (step {ls[0]['step']}) → "
                  f"{ls[-1]['loss']:.3f} (step {ls[-1]['step']})\n")
        md.append("loss curve: " + ", ".join(f"{x['step']}:{x['loss']:.3f}" for x in ls) + "\n")
    (out / f"{name}.md").write_text("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not runs:
            return payload
        fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5))
        for ax, (stage, r) in zip(axes if len(runs) > 1 else [axes], runs.items(), strict=True):
            ax.plot([x["step"] for x in r["losses"]], [x["loss"] for x in r["losses"]])
            ax.set_title(stage)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        fig.tight_layout()
        fig.savefig(out / f"{name}_loss.png", dpi=100)
    except ImportError:
        pass
    return payload


def _checkpoints(folder: Path, last_step: int) -> list:
    """The curve: ``(step, folder)`` of every checkpoint before the final output (which is the last step's)."""
    found = sorted((int(c.name.split("-")[1]), c) for c in folder.glob("checkpoint-*"))
    return [(step, c) for step, c in found if step < last_step]


def _runtime(run: dict) -> str:
    return f"{run['train_runtime_s']:.0f} s" if run.get("train_runtime_s") else "trained in an earlier run"


def main(argv=None) -> int:
    from llm2vec_fast.training.contrastive import ContrastiveArguments, train_contrastive
    from llm2vec_fast.training.mntp import MNTPArguments, train_mntp

    _bench_common()  # refused up front where the report could not be written at the end

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="/tmp/llm2vec_fast_evidence", help="training outputs (not committed)")
    p.add_argument("--model", default=None)
    p.add_argument("--mntp-steps", type=int, default=150)
    p.add_argument("--mntp-batch", type=int, default=8)
    p.add_argument("--mntp-len", type=int, default=128)
    p.add_argument("--mntp-lr", type=float, default=2e-4)
    p.add_argument("--mntp-files", nargs="+", default=["wikitext-2-raw.wiki.test.raw"],
                   help="MNTP training files in the shared wiki_text folder")
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap per training stage (each stops "
                   "and saves there, even before its steps are done)")
    p.add_argument("--simcse-steps", type=int, default=100)
    p.add_argument("--simcse-batch", type=int, default=32)
    p.add_argument("--simcse-len", type=int, default=64)
    p.add_argument("--simcse-lr", type=float, default=1e-4)
    p.add_argument("--sts-limit", type=int, default=None, help="first N STS-B dev pairs (default all 1500)")
    p.add_argument("--mntp-eval-every", type=int, default=0,
                   help="also score MNTP checkpoints every N steps (bidirectional): a curve")
    p.add_argument("--simcse-eval-every", type=int, default=0,
                   help="also score the SimCSE adapter every N steps (from its checkpoints): a Spearman curve")
    p.add_argument("--skip-simcse", action="store_true")
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="also train supervised (SNLI dev/test triplets, on the MNTP model) for N steps; 0: skip")
    p.add_argument("--supervised-batch", type=int, default=16)
    p.add_argument("--supervised-len", type=int, default=64)
    p.add_argument("--supervised-lr", type=float, default=2e-4)
    p.add_argument("--skip-base", action="store_true", help="do not score the untrained model")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score the base model and the outputs already in --work (mntp, simcse, "
                        "supervised) on --sts-limit pairs (default all 1500)")
    p.add_argument("--reuse-mntp", action="store_true",
                   help="use the MNTP output already in --work (from an earlier run) instead of training it again")
    p.add_argument("--name", default="training_evidence", help="result file name stem")
    p.add_argument("--no-weighted-baseline", dest="weighted_baseline", action="store_false",
                   help="skip the causal weighted-mean baseline (evaluated last)")
    a = p.parse_args(argv)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    wiki = _shared() / "data" / "wiki_text"
    rows, runs, t0 = [], {}, time.time()

    def sts(stage, **kw):
        t = time.time()
        s = stsb_spearman(kw.pop("model", a.model), limit=a.sts_limit, **kw)
        rows.append({"stage": stage, "attention": "bidirectional" if kw.get("bidirectional", True) else "causal",
                     "pooling": kw.get("pooling", "mean"), "stsb_dev_spearman": round(100 * s, 2),
                     "eval_s": round(time.time() - t, 1), "sts_pairs": a.sts_limit or 1500})
        print(rows[-1], flush=True)
        write_report(out, rows, runs, t0, name=a.name)

    mntp_dir = work / "mntp"
    if a.rescore:
        sts("base", bidirectional=False)
        sts("base", bidirectional=False, pooling="weighted_mean")
        sts("base", bidirectional=True)
        if (mntp_dir / "llm2vec_training.json").exists():
            sts("mntp", model=str(mntp_dir), bidirectional=True)
            for stage in ("simcse", "supervised"):
                if (work / stage / "adapter_config.json").exists():
                    sts(f"mntp+{stage}", model=str(mntp_dir), peft=str(work / stage), bidirectional=True)
        print(json.dumps({"rows": rows}))
        return 0
    if not a.skip_base:
        sts("base", bidirectional=False)
        sts("base", bidirectional=True)

    done = mntp_dir / "llm2vec_training.json"
    if a.reuse_mntp and done.exists():
        info = json.loads(done.read_text())
        ma = info["arguments"]
        runs["mntp"] = {"steps": ma["max_steps"], "batch": ma["batch_size"], "seq_len": ma["max_seq_length"],
                        "lr": ma["learning_rate"], "data": "wikitext-2-raw test", "reused": str(mntp_dir),
                        "train_runtime_s": None, "losses": info["losses"]}
    else:
        if a.reuse_mntp:
            raise FileNotFoundError(f"--reuse-mntp: no MNTP output in {mntp_dir} ({done.name} missing)")
        m = train_mntp(MNTPArguments(
            train_files=[str(wiki / f) for f in a.mntp_files], output_dir=str(mntp_dir), model=a.model,
            overwrite_output_dir=True,  # a rerun replaces the work folder's earlier run
            max_seq_length=a.mntp_len, batch_size=a.mntp_batch, max_steps=a.mntp_steps, learning_rate=a.mntp_lr,
            logging_steps=max(1, a.mntp_steps // 25), save_steps=a.mntp_eval_every, disable_tqdm=True,
            max_train_seconds=a.max_seconds))
        for step, c in _checkpoints(mntp_dir, m["stopped_at"] or a.mntp_steps):
            sts(f"mntp@{step}", model=a.model, peft=str(c), bidirectional=True)
        sts("mntp", model=str(mntp_dir), bidirectional=True)
        sts("mntp", model=str(mntp_dir), bidirectional=False)
        runs["mntp"] = {"steps": m["stopped_at"] or a.mntp_steps, "batch": a.mntp_batch, "seq_len": a.mntp_len,
                        "lr": a.mntp_lr, "data": " + ".join(a.mntp_files), "train_runtime_s": m["train_runtime"],
                        "losses": m["losses"], "stopped_by_time_limit": m["stopped_at"] is not None}
    write_report(out, rows, runs, t0, name=a.name)

    if not a.skip_simcse:
        simcse_dir = work / "simcse"
        s = train_contrastive(ContrastiveArguments(
            mode="simcse", train_files=[str(wiki / "wiki1m_for_simcse.head1280000B.txt")], output_dir=str(simcse_dir),
            overwrite_output_dir=True,  # a rerun replaces the work folder's earlier run
            model=str(mntp_dir), batch_size=a.simcse_batch, max_length=a.simcse_len, max_steps=a.simcse_steps,
            learning_rate=a.simcse_lr, logging_steps=max(1, a.simcse_steps // 25), save_steps=a.simcse_eval_every,
            disable_tqdm=True, max_train_seconds=a.max_seconds))
        for step, c in _checkpoints(simcse_dir, s["stopped_at"] or a.simcse_steps):
            sts(f"mntp+simcse@{step}", model=str(mntp_dir), peft=str(c), bidirectional=True)
        sts("mntp+simcse", model=str(mntp_dir), peft=str(simcse_dir), bidirectional=True)
        runs["simcse"] = {"steps": s["stopped_at"] or a.simcse_steps, "batch": a.simcse_batch, "seq_len": a.simcse_len,
                          "lr": a.simcse_lr, "attention_dropout": 0.3, "data": "wiki1m head (1.28 MB)",
                          "train_runtime_s": s["train_runtime"], "losses": s["losses"]}

    if a.supervised_steps:
        sup_dir = work / "supervised"
        r = train_contrastive(ContrastiveArguments(
            mode="supervised", train_files=[str(_shared() / "data" / "snli" / "snli_devtest_triplets.csv")],
            output_dir=str(sup_dir), overwrite_output_dir=True, model=str(mntp_dir), instructions=[SNLI_INSTRUCTION],
            batch_size=a.supervised_batch, max_length=a.supervised_len, max_steps=a.supervised_steps,
            learning_rate=a.supervised_lr, warmup_steps=min(300, a.supervised_steps // 10),
            logging_steps=max(1, a.supervised_steps // 25), save_steps=0, disable_tqdm=True,
            max_train_seconds=a.max_seconds))
        sts("mntp+supervised", model=str(mntp_dir), peft=str(sup_dir), bidirectional=True)
        runs["supervised"] = {"steps": r["stopped_at"] or a.supervised_steps, "batch": a.supervised_batch,
                              "seq_len": a.supervised_len, "lr": a.supervised_lr,
                              "data": "SNLI dev+test triplets (1 hard negative)", "train_runtime_s": r["train_runtime"],
                              "losses": r["losses"]}

    if a.weighted_baseline:
        sts("base", bidirectional=False, pooling="weighted_mean")
    payload = write_report(out, rows, runs, t0, name=a.name)
    print(json.dumps({"rows": rows, "total_s": payload["total_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
