"""Shared helpers for benchmark scripts: environment stamp, timing, result files (JSON + markdown)."""
import datetime as _dt
import json
import os
import platform
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHARED = Path(os.environ.get("LLM2VEC_FAST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"


def environment() -> dict:
    """Card, versions and date: stamped into every result row."""
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
    else:
        card = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "card": card,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": ver("triton"),
        "transformers": ver("transformers"),
        "peft": ver("peft"),
        "sentence_transformers": ver("sentence-transformers"),
        "llm2vec_fast": ver("llm2vec_fast"),
    }


def bench_gpu(fn, warmup=25, rep=100) -> float:
    """Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: list[dict], out_dir=None, columns=None, title=None, notes: str = "") -> Path:
    """Write ``<name>.json`` (env + rows) and ``<name>.md`` under ``out_dir`` (default benchmarks/results)."""
    out = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"benchmark": name, "environment": env, "rows": rows, "notes": notes}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    head = f"# {title or name}\n\n{env['card']} · torch {env['torch']} · triton {env['triton']} · " \
           f"transformers {env['transformers']} · {env['date']}\n\n"
    (out / f"{name}.md").write_text(head + markdown_table(rows, columns) + ("\n" + notes + "\n" if notes else ""))
    return out / f"{name}.json"
