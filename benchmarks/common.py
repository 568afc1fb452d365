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


# kernel-name patterns, first match wins: where a profile's device time goes
_KERNEL_CLASSES = (
    ("attention (ours)", ("_attn_",)),
    ("LoRA dropout + projection (ours)", ("_dp_fwd", "_dp_dw", "_dp_dx")),
    ("fused ops (ours)", ("_rms_norm", "_rmsnorm", "_silu", "_gelu", "_rope", "_pool", "_ce_", "_lce", "cross_entropy",
                          "_masked_pool", "_dropout_mask")),
    ("attention (torch)", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "magma", "splitk")),
    ("copy / cast", ("copy", "cast", "fill", "memset", "memcpy", "cat", "index", "gather", "scatter")),
    ("elementwise / reduce", ("elementwise", "reduce", "softmax", "dropout", "bernoulli", "philox", "norm")),
)


def kernel_class(name: str) -> str:
    """A coarse class for a device kernel's name (matmul, our attention, our fused ops, elementwise, ...)."""
    low = name.lower()
    for cls, keys in _KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_breakdown(prof, wall: float, top: int = 12, **extra) -> tuple[list[dict], list[dict], float]:
    """Device time of a ``torch.profiler`` run: (the ``top`` kernels, one row per kernel class, busy seconds).

    Busy = the kernels' own times summed (one stream: they do not overlap); each row carries ``extra`` fields."""
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        if us > 0 and "cuda" in str(getattr(e, "device_type", "")).lower():
            kernels.append((e.key, e.count, us / 1e6))
    busy = sum(k[2] for k in kernels)
    kernels.sort(key=lambda k: -k[2])
    rows = [{**extra, "kernel": name[:90], "class": kernel_class(name), "calls": n, "seconds": sec,
             "share_of_busy": sec / busy if busy else None, "share_of_wall": sec / wall if wall else None}
            for name, n, sec in kernels[:top]]
    classes: dict[str, list] = {}
    for name, n, sec in kernels:
        c = classes.setdefault(kernel_class(name), [0, 0.0])
        c[0] += n
        c[1] += sec
    class_rows = [{**extra, "class": cls, "calls": n, "seconds": sec, "share_of_busy": sec / busy if busy else None,
                   "share_of_wall": sec / wall if wall else None}
                  for cls, (n, sec) in sorted(classes.items(), key=lambda kv: -kv[1][1])]
    return rows, class_rows, busy


def training_run_lines(runs: dict) -> list[str]:
    """Markdown lines, one per training run ``{name: {"steps", "train_runtime_s", "losses"}}``: steps, time and the
    first and last logged loss."""
    out = []
    for name, r in runs.items():
        ls = r["losses"]
        out.append(f"\n**{name}**: {r['steps']} steps in {r['train_runtime_s']:.0f} s; loss {ls[0]['loss']:.3f} "
                   f"(step {ls[0]['step']}) → {ls[-1]['loss']:.3f} (step {ls[-1]['step']})\n")
    return out


def write_training_evidence(out: Path, stem: str, payload: dict, title: str, model, peft, details: str) -> None:
    """Write an evidence script's ``<stem>.json`` (``payload``, with its ``environment``, ``rows`` and ``runs``) and
    ``<stem>.md``: the title, the card and versions, which model was trained (``model`` None: the default one;
    ``peft``: an adapter merged first) followed by ``details``, the rows' table and one line per training run; then
    print the rows and the total time as one JSON line."""
    import json

    env = payload["environment"]
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    md = [f"# {title}\n",
          f"{env['card']} · torch {env['torch']} · transformers {env['transformers']} · {env['date']}\n",
          f"{'SmolLM2-135M-Instruct' if model is None else 'model ' + repr(model)}"
          f"{'' if peft is None else ' with ' + repr(peft) + ' merged'}, {details}\n",
          markdown_table(payload["rows"])]
    md += training_run_lines(payload["runs"])
    (out / f"{stem}.md").write_text("\n".join(md))
    print(json.dumps({"rows": payload["rows"], "total_s": payload["total_s"]}))


def training_evidence_parser(doc: str, work: str, steps: int, sts_limit: int | None):
    """The argument parser the training-evidence scripts share: output and work folders, the starting model and
    adapter, the result files' name suffix, steps, batch, learning rate, STS pairs scored, a time cap per run."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default=work, help="training outputs (not committed)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct; e.g. an MNTP output")
    p.add_argument("--peft", default=None, help="an adapter merged into --model before training (e.g. SimCSE's)")
    p.add_argument("--name", default=None, help="suffix of the result files (e.g. after-simcse)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--sts-limit", type=int, default=sts_limit,
                   help=f"score the first N pairs (default: {'all' if sts_limit is None else sts_limit})")
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap per training run")
    return p
