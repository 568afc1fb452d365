"""The evidence report writer (the training runs themselves are recorded under benchmarks/results/)."""
import json
import time

from llm2vec_fast.training.evidence import write_report


def test_write_report_tables_and_loss_lines(tmp_path):
    rows = [{"stage": "base", "attention": "causal", "pooling": "mean", "stsb_dev_spearman": 50.61, "eval_s": 3.0,
             "sts_pairs": 500},
            {"stage": "mntp+simcse@150", "attention": "bidirectional", "pooling": "mean", "stsb_dev_spearman": 31.2,
             "eval_s": 2.0, "sts_pairs": 500}]
    runs = {"mntp": {"steps": 200, "batch": 4, "seq_len": 128, "lr": 2e-4, "data": "wikitext", "reused": "/x",
                     "train_runtime_s": None, "losses": [{"step": 8, "loss": 6.6}, {"step": 200, "loss": 4.0}]},
            "simcse": {"steps": 600, "batch": 16, "seq_len": 64, "lr": 5e-4, "data": "wiki1m",
                       "train_runtime_s": 2520.4, "losses": [{"step": 24, "loss": 0.26}, {"step": 600, "loss": 0.1}]}}
    payload = write_report(tmp_path, rows, runs, time.time(), name="ev")
    md = (tmp_path / "ev.md").read_text()
    assert "500 pairs" in md and "| mntp+simcse@150 | bidirectional | mean | 31.2 |" in md
    assert "wikitext, trained in an earlier run; loss 6.600 (step 8) → 4.000 (step 200)" in md
    assert "wiki1m, 2520 s; loss 0.260 (step 24) → 0.100 (step 600)" in md
    saved = json.loads((tmp_path / "ev.json").read_text())
    assert saved["rows"] == rows and saved["runs"]["simcse"]["steps"] == 600 and payload["rows"] == rows


def test_main_runs_every_stage_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The whole evidence pipeline (base scores, MNTP, SimCSE with a checkpoint curve, supervised, report) on a tiny
    random model, two steps a stage: every row and run is written."""
    from llm2vec_fast.training.evidence import main

    out = tmp_path / "out"
    assert main(["--out", str(out), "--work", str(tmp_path / "work"), "--model", tiny_model_dir,
                 "--mntp-steps", "2", "--mntp-batch", "2", "--mntp-len", "32", "--mntp-eval-every", "1",
                 "--simcse-steps", "2",
                 "--simcse-batch", "4", "--simcse-len", "16", "--simcse-eval-every", "1", "--supervised-steps", "2",
                 "--supervised-batch", "4", "--supervised-len", "16", "--sts-limit", "12", "--max-seconds", "120",
                 "--name", "ev"]) == 0
    saved = json.loads((out / "ev.json").read_text())
    stages = [(r["stage"], r["attention"], r["pooling"]) for r in saved["rows"]]
    assert stages == [("base", "causal", "mean"), ("base", "bidirectional", "mean"),
                      ("mntp@1", "bidirectional", "mean"), ("mntp", "bidirectional", "mean"),
                      ("mntp", "causal", "mean"), ("mntp+simcse@1", "bidirectional", "mean"),
                      ("mntp+simcse", "bidirectional", "mean"), ("mntp+supervised", "bidirectional", "mean"),
                      ("base", "causal", "weighted_mean")]
    assert all(r["sts_pairs"] == 12 and -100 <= r["stsb_dev_spearman"] <= 100 for r in saved["rows"])
    assert set(saved["runs"]) == {"mntp", "simcse", "supervised"}
    assert saved["runs"]["mntp"]["steps"] == 2 and not saved["runs"]["mntp"]["stopped_by_time_limit"]
