"""Benchmark report: synthetic result files in tmp_path → one markdown page with tables, plots and headlines."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm2vec_fast import report

ENV = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "torch": "2.11.0", "triton": "3.6.0",
       "transformers": "5.17.0"}


def _write(folder: Path, name: str, rows, env=ENV, notes=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"benchmark": name, "environment": env, "rows": rows,
                                                     "notes": notes}))


def _fixture_results(folder: Path):
    _write(folder, "attention", [
        {"case": "uniform[128,512]", "Hq/Hkv": "32/8", "D": 128, "B": 64, "mean_len": 320.0, "max_len": 512,
         "ours fwd": 310.5, "ours fwd+bwd": 190.0, "varlen fwd": 220.0, "varlen fwd+bwd": None,
         "×varlen fwd": 1.41},
        {"case": "uniform[512,2048]", "Hq/Hkv": "32/8", "D": 128, "B": 16, "mean_len": 1280.0, "max_len": 2048,
         "ours fwd": 400.0, "ours fwd+bwd": 280.0, "varlen fwd": 300.0, "varlen fwd+bwd": 250.0,
         "×varlen fwd": 1.33, "×varlen fwd+bwd": 1.12},
    ], notes="TFLOP/s count real tokens only.")
    _write(folder, "encode_llama-1.3b_gpu", [
        {"model": "llama-1.3b", "corpus": "wikitext", "path": "hf-ref b32", "tokens_per_s": 48900.0, "mfu": 0.166},
        {"model": "llama-1.3b", "corpus": "wikitext", "path": "ours default", "tokens_per_s": 99000.0, "mfu": 0.336,
         "x_vs_hf-ref_b32": 2.0},
        {"model": "llama-1.3b", "corpus": "wiki1m", "path": "hf-ref b32", "tokens_per_s": 20300.0, "mfu": 0.069},
        {"model": "llama-1.3b", "corpus": "wiki1m", "path": "ours default", "tokens_per_s": 70000.0, "mfu": 0.237,
         "x_vs_hf-ref_b32": 3.5},
    ])
    _write(folder, "training_steps", [
        {"step": "MNTP 1.3b 32x512", "path": "original", "tokens_per_s": 11600.0, "step_ms": 1412.0,
         "peak_mem_gb": 11.2},
        {"step": "MNTP 1.3b 32x512", "path": "ours", "tokens_per_s": 20100.0, "step_ms": 815.0, "peak_mem_gb": 6.1},
        {"step": "SimCSE 1.3b 128x128", "path": "original", "tokens_per_s": None, "step_ms": None,
         "peak_mem_gb": "OOM"},
    ], env={**ENV, "card": "NVIDIA H200"})
    _write(folder, "cpu_vs_llm2vec", [{"contender": "llm2vec 0.2.3", "sentences_per_s": 66.0, "ratio_vs_original": 1.0},
                                      {"contender": "ours fp32", "sentences_per_s": 120.0,
                                       "ratio_vs_original": 1.82, "min_cosine": 0.99999912}],
           env={"card": "CPU x86_64 x2 threads", "date": "2026-11-25", "torch": "2.13.0"})
    (folder / "broken.json").write_text("{not json")
    (folder / "other.json").write_text(json.dumps({"hello": 1}))
    (folder / "attention.md").write_text("# not read\n")


def test_classify_by_fields(tmp_path):
    _fixture_results(tmp_path)
    results, skipped = report.load_results(tmp_path)
    kinds = {r["_file"]: report.classify(r) for r in results}
    assert kinds == {"attention.json": "attention", "encode_llama-1.3b_gpu.json": "encode",
                     "training_steps.json": "training", "cpu_vs_llm2vec.json": "table"}
    assert any(s.startswith("broken.json: unreadable") for s in skipped)
    assert "other.json: not a benchmark result (no 'rows' list)" in skipped
    att = next(r for r in results if r["_file"] == "attention.json")
    assert report.attention_peers(att["rows"]) == ["ours", "varlen"]


def test_headline_ratios():
    res = {"rows": [{"×varlen fwd": 1.41}, {"×varlen fwd": 1.33, "×varlen fwd+bwd": 1.12}, {"×varlen fwd": None}]}
    assert report.headline(res) == ["×varlen fwd: median 1.37× (1.33–1.41, 2 rows)", "×varlen fwd+bwd: median 1.12×"]


def test_build_report_with_plots(tmp_path):
    pytest.importorskip("matplotlib")
    _fixture_results(tmp_path)
    out = report.build_report(tmp_path)
    assert out == tmp_path / "REPORT.md"
    page = out.read_text()
    for section in ("## Attention TFLOP/s by length and peer", "## Encode throughput and MFU by corpus and peer",
                    "## Training steps: tokens/s and peak memory by peer", "## Other results", "## Files skipped"):
        assert section in page
    assert "NVIDIA H100 80GB HBM3 · torch 2.11.0 · triton 3.6.0 · transformers 5.17.0 · 2026-11-26" in page
    assert "NVIDIA H200 · torch 2.11.0" in page and "CPU x86_64 x2 threads · torch 2.13.0 · 2026-11-25" in page
    assert "x_vs_hf-ref_b32: median 2.75× (2.00–3.50, 2 rows)" in page
    assert "ratio_vs_original: median 1.82×" in page
    assert "| uniform[512,2048] | 32/8 | 128 | 16 | 1,280 | 2048 | 400 | 280 | 300 | 250 | 1.33 | 1.12 |" in page
    assert "| SimCSE 1.3b 128x128 | original | — | — | OOM |" in page
    assert "TFLOP/s count real tokens only." in page
    assert "| ours fp32 | 120 | 1.82 | 0.9999991 |" in page
    pngs = sorted(p.name for p in tmp_path.glob("report_*.png"))
    assert pngs == ["report_attention_tflops.png", "report_encode_llama-1.3b_gpu_mfu.png",
                    "report_training_steps_training.png"]
    for name in pngs:
        assert f"]({name})" in page
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_plots_and_empty_folder(tmp_path):
    _fixture_results(tmp_path / "r")
    out = report.build_report(tmp_path / "r", tmp_path / "page" / "R.md", plots=False)
    assert out.is_file() and not list((tmp_path / "page").glob("*.png"))
    assert "![" not in out.read_text()
    (tmp_path / "nothing").mkdir()
    empty = report.build_report(tmp_path / "nothing", tmp_path / "empty.md")
    assert "No benchmark results found yet" in empty.read_text()
    # a folder that does not exist (a typo) is an error, not an empty report written into a new folder
    with pytest.raises(FileNotFoundError, match="results folder .*none' does not exist"):
        report.build_report(tmp_path / "none", tmp_path / "typo.md")
    assert not (tmp_path / "none").exists() and not (tmp_path / "typo.md").exists()


def test_missing_matplotlib_is_noted(tmp_path, monkeypatch):
    _fixture_results(tmp_path)
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    page = report.build_report(tmp_path).read_text()
    assert "Plots skipped: matplotlib is not installed" in page and "## Attention" in page


def test_cli_and_script(tmp_path, capsys):
    import argparse

    _fixture_results(tmp_path)
    p = argparse.ArgumentParser()
    bench = p.add_subparsers(dest="command").add_parser("bench").add_subparsers(dest="bench_command")
    report.add_bench_report(bench)
    args = p.parse_args(["bench", "report", "--results", str(tmp_path), "--no-plots"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().split("\n")[-1] == str(tmp_path / "REPORT.md")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"
    done = subprocess.run([sys.executable, str(script), "--results", str(tmp_path), "--output",
                           str(tmp_path / "S.md"), "--no-plots"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "S.md").read_text() == (tmp_path / "REPORT.md").read_text()


def test_headline_labels_tell_two_runs_of_one_benchmark_apart():
    from llm2vec_fast.report import _label

    assert _label({"_file": "encode_x.json", "benchmark": "encode_x"}) == "encode_x"
    assert _label({"_file": "encode_x_fused.json", "benchmark": "encode_x"}) == "encode_x [encode_x_fused]"
