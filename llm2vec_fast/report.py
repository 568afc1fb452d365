"""Gather benchmark result files into one markdown page with tables and PNG plots.

Input: ``benchmarks/results/*.json`` as written by ``benchmarks/common.write_results``::

    {"benchmark": name, "environment": {"card", "date", "torch", "triton", "transformers", ...},
     "rows": [{...}, ...], "notes": "..."}

Each file is classified by the fields of its rows, not by its name, so new benchmark scripts land in the right
section as long as they use the same field names:

- **attention**: numeric columns named ``"<peer> fwd"`` / ``"<peer> fwd+bwd"`` (TFLOP/s), one row per length case;
  plotted as TFLOP/s by case and peer.
- **encode**: rows with ``corpus``, ``path`` (the peer: ``hf-ref b32``, ``st b32``, ``ours default``...) and ``mfu``
  (or ``tokens_per_s``); plotted as MFU by corpus and peer.
- **training**: rows with ``step``, ``path`` and ``tokens_per_s`` (+ ``peak_mem_gb``); plotted as tokens/s and peak
  memory by step and peer.
- anything else: a plain table.

Every section carries its card, versions and date. Ratio columns (``×peer ...``, ``x_vs_...``, ``ratio...``,
``speedup``) feed a headline list at the top. Unreadable files are listed, not fatal; plots are skipped with a note
when matplotlib is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

_DIR_FWD = re.compile(r"^(?P<peer>[^×].*) (?P<dir>fwd|fwd\+bwd)$")
_RATIO = re.compile(r"^(×|x_vs_|ratio|speedup)")


def default_results_dir() -> Path:
    """``benchmarks/results`` of the source checkout this package lives in, else of the working directory."""
    here = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    return here if here.parent.is_dir() else Path.cwd() / "benchmarks" / "results"


# ---------------------------------------------------------------------- loading and classifying
def load_results(results_dir) -> tuple[list[dict], list[str]]:
    """Read every ``*.json`` in ``results_dir``: (valid result files with a ``_file`` key added, skip messages)."""
    results_dir = Path(results_dir)
    found, skipped = [], []
    if not results_dir.is_dir():
        return found, [f"{results_dir}: no such folder"]
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            skipped.append(f"{path.name}: not a benchmark result (no 'rows' list)")
            continue
        rows = [r for r in data["rows"] if isinstance(r, dict)]
        if not rows:
            skipped.append(f"{path.name}: no rows")
            continue
        data = dict(data, rows=rows, _file=path.name)
        data.setdefault("benchmark", path.stem)
        if not isinstance(data.get("environment"), dict):
            data["environment"] = {}
        found.append(data)
    return found, skipped


def _label(result: dict) -> str:
    """A result's name in the headline: its benchmark, and its file when that says more (two runs of one benchmark,
    e.g. ``encode_llama-1.3b_gpu.json`` and ``encode_llama-1.3b_gpu_fused.json``, must not read as one)."""
    stem = Path(result["_file"]).stem
    return result["benchmark"] if stem == result["benchmark"] else f"{result['benchmark']} [{stem}]"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def classify(result: dict) -> str:
    """``attention`` | ``encode`` | ``training`` | ``table`` from the rows' fields (see the module docstring)."""
    rows = result["rows"]
    keys = {k for r in rows for k in r}
    if any(_DIR_FWD.match(k) and any(_num(r.get(k)) is not None for r in rows) for k in keys):
        return "attention"
    if {"corpus", "path"} <= keys and ({"mfu"} & keys or {"tokens_per_s"} & keys):
        return "encode"
    if {"step", "path", "tokens_per_s"} <= keys:
        return "training"
    return "table"


def environment_line(env: dict) -> str:
    """``card · torch X · triton Y · transformers Z · date`` (missing fields left out)."""
    parts = [env.get("card") or "unknown card"]
    for key in ("torch", "triton", "transformers", "sentence_transformers"):
        if env.get(key):
            parts.append(f"{key.replace('_', '-')} {env[key]}")
    parts.append(env.get("date") or "undated")
    return " · ".join(str(p) for p in parts)


# ---------------------------------------------------------------------- tables
def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if 0.99 <= v < 1:  # cosines and parities: 3 significant digits would print 0.9999991 as 1
            return f"{v:.7f}"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (missing cells shown as —)."""
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _columns(rows, first: list[str]) -> list[str]:
    seen = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.append(k)
    return [c for c in first if c in seen] + [c for c in seen if c not in first]


def attention_peers(rows) -> list[str]:
    """Peer names that have a numeric ``"<peer> fwd"`` or ``"<peer> fwd+bwd"`` column, in first-seen order."""
    peers = []
    for r in rows:
        for k, v in r.items():
            m = _DIR_FWD.match(k)
            if m and _num(v) is not None and m["peer"] not in peers:
                peers.append(m["peer"])
    return peers


def _case_label(r: dict) -> str:
    label = str(r.get("case", "?"))
    if r.get("Hq/Hkv"):
        label += f" {r['Hq/Hkv']}"
    if r.get("D") is not None:
        label += f" D{r['D']}"
    return label


def headline(result: dict) -> list[str]:
    """One line per ratio column: median and range over the rows (e.g. ``×varlen fwd: median 1.31× (1.10–1.60, 4
    rows)``); rows holding exactly 1.0 (the reference compared with itself) are left out."""
    out = []
    keys = _columns(result["rows"], [])
    for k in keys:
        if not _RATIO.match(k):
            continue
        # a row that is the reference itself carries exactly 1.0: not a comparison
        vals = sorted(v for v in (_num(r.get(k)) for r in result["rows"]) if v is not None and v != 1.0)
        if not vals:
            continue
        mid = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
        rng = f" ({vals[0]:.2f}–{vals[-1]:.2f}, {len(vals)} rows)" if len(vals) > 1 else ""
        out.append(f"{k}: median {mid:.2f}×{rng}")
    return out


# ---------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str):
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, ys, width, label=name)
        for b, v in zip(bars, vals, strict=True):
            if v is None:  # missing or OOM: mark the slot so it is not read as zero
                ax.annotate("n/a", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", fontsize=6,
                            rotation=90)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_result(result: dict, kind: str, out_dir: Path, plt) -> list[Path]:
    """Write the PNG plot(s) of one result file; returns their paths (none for plain tables)."""
    rows, env = result["rows"], result["environment"]
    stem = Path(result["_file"]).stem
    subtitle = environment_line(env)
    paths = []
    if kind == "attention":
        cases = [_case_label(r) for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
        for ax, direction in zip(axes[0], ("fwd", "fwd+bwd"), strict=True):
            series = {p: [_num(r.get(f"{p} {direction}")) for r in rows] for p in attention_peers(rows)}
            series = {p: v for p, v in series.items() if any(x is not None for x in v)}
            _grouped_bars(ax, cases, series, "TFLOP/s")
            ax.set_title(f"attention {direction}", fontsize=9)
        paths.append(out_dir / f"report_{stem}_tflops.png")
    elif kind == "encode":
        corpora = list(dict.fromkeys(str(r.get("corpus")) for r in rows))
        peers = list(dict.fromkeys(str(r.get("path")) for r in rows))
        use_mfu = any(_num(r.get("mfu")) is not None for r in rows)
        metric, label = ("mfu", "MFU (%)") if use_mfu else ("tokens_per_s", "tokens/s")
        scale = 100.0 if use_mfu else 1.0
        series = {}
        for p in peers:
            vals = []
            for c in corpora:
                v = next((_num(r.get(metric)) for r in rows if str(r.get("corpus")) == c and str(r.get("path")) == p),
                         None)
                vals.append(None if v is None else v * scale)
            series[p] = vals
        fig, ax = plt.subplots(figsize=(10, 4.5))
        _grouped_bars(ax, corpora, series, label)
        ax.set_title(f"encode {label} by corpus and peer", fontsize=9)
        paths.append(out_dir / f"report_{stem}_{metric}.png")
    elif kind == "training":
        steps = list(dict.fromkeys(str(r.get("step")) for r in rows))
        peers = list(dict.fromkeys(str(r.get("path")) for r in rows))
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), squeeze=False)
        for ax, (metric, label) in zip(axes[0], (("tokens_per_s", "tokens/s"), ("peak_mem_gb", "peak memory (GB)")),
                                       strict=True):
            series = {p: [next((_num(r.get(metric)) for r in rows if str(r.get("step")) == s and
                                str(r.get("path")) == p), None) for s in steps] for p in peers}
            _grouped_bars(ax, steps, series, label)
            ax.set_title(f"training {label} (n/a: missing or out of memory)", fontsize=9)
        paths.append(out_dir / f"report_{stem}_training.png")
    else:
        return []
    fig.suptitle(f"{result['benchmark']} — {subtitle}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------- page
_FIRST = {
    "attention": ["case", "Hq/Hkv", "D", "B", "mean_len", "max_len"],
    "encode": ["model", "corpus", "texts", "avg_tokens", "path", "batch", "dtype", "tokens_per_s", "sentences_per_s",
               "mfu", "peak_mem_gib"],
    "training": ["step", "path", "tokens_per_s", "step_ms", "peak_mem_gb"],
}
_TITLES = {
    "attention": "Attention TFLOP/s by length and peer",
    "encode": "Encode throughput and MFU by corpus and peer",
    "training": "Training steps: tokens/s and peak memory by peer",
    "table": "Other results",
}


def build_report(results_dir=None, output=None, plots: bool = True) -> Path:
    """Write ``REPORT.md`` (default: in ``results_dir``) and its PNG plots beside it; returns the page's path."""
    results_dir = Path(results_dir) if results_dir is not None else default_results_dir()
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {str(results_dir)!r} does not exist (a benchmark writes its JSON "
                                "there; default: benchmarks/results)")
    output = Path(output) if output is not None else results_dir / "REPORT.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    results, skipped = load_results(results_dir)
    plt = _pyplot() if plots else None

    by_kind: dict[str, list[dict]] = {k: [] for k in _TITLES}
    for r in results:
        by_kind[classify(r)].append(r)

    lines = ["# llm2vec_fast benchmark report", "",
             f"Gathered from {len(results)} result file(s) in `{results_dir.name}/`. Every section names the card, "
             "versions and date of its run; ratios compare runs made side by side in one process.", ""]
    heads = [(r, h) for r in results for h in headline(r)]
    if heads:
        lines += ["## Headline ratios (ours ÷ peer; > 1 is faster)", ""]
        lines += [f"- **{_label(r)}** ({r['environment'].get('card', 'unknown card')}): {h}" for r, h in heads]
        lines.append("")
    if plots and plt is None:
        lines += ["*Plots skipped: matplotlib is not installed (`pip install matplotlib`).*", ""]

    for kind, title in _TITLES.items():
        if not by_kind[kind]:
            continue
        lines += [f"## {title}", ""]
        for r in by_kind[kind]:
            lines += [f"### {r['benchmark']} (`{r['_file']}`)", "", environment_line(r["environment"]), ""]
            if plt is not None:
                for p in plot_result(r, kind, output.parent, plt):
                    lines += [f"![{r['benchmark']}]({p.name})", ""]
            rows = r["rows"]
            lines.append(markdown_table(rows, _columns(rows, _FIRST.get(kind, []))))
            if r.get("notes"):
                lines += [str(r["notes"]).strip(), ""]
    if not results:
        lines += ["No benchmark results found yet: run the scripts in `benchmarks/` (each writes "
                  "`benchmarks/results/<name>.json`).", ""]
    if skipped:
        lines += ["## Files skipped", ""] + [f"- {s}" for s in skipped] + [""]
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(output)
    return output


# ---------------------------------------------------------------------- CLI
def add_bench_report(bench_subparsers):
    """Add ``report`` to the ``bench`` subcommand's subparsers (``llm2vec-fast bench report``); sets ``func``."""
    p = bench_subparsers.add_parser("report", help="gather benchmarks/results/*.json into REPORT.md with plots",
                                    description=__doc__.split("\n\n")[0])
    _report_options(p)
    p.set_defaults(func=run_bench_report)
    return p


def _report_options(p):
    p.add_argument("--results", default=None, help="folder of result JSON files (default: benchmarks/results)")
    p.add_argument("--output", default=None, help="markdown page to write (default: <results>/REPORT.md)")
    p.add_argument("--no-plots", action="store_true", help="tables only, no PNG plots")


def run_bench_report(args) -> int:
    """Build the report from parsed args; prints the page's path as the last line; returns 0."""
    path = build_report(args.results, args.output, plots=not args.no_plots)
    print(path)
    return 0


def main(argv=None) -> int:
    """``python benchmarks/report.py [--results DIR] [--output FILE] [--no-plots]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _report_options(p)
    return run_bench_report(p.parse_args(argv))
