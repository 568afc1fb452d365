"""End-to-end encode throughput: ours against the Hugging Face reference path and sentence-transformers, one run.

    python benchmarks/bench_encode.py --model llama-1.3b --corpus all          # GPU, bf16
    python benchmarks/bench_encode.py                                          # CPU: SmolLM2, fp32, small subsets
    llm2vec-fast bench encode ...                                              # the same, from the CLI

In one process, on the same texts, with the same model object:

* ``hf-ref b32`` / ``hf-ref b128``: the path the original llm2vec 0.2.3 runs — texts sorted by length (longest
  first), padded batches of 32 / 128 tokenized per batch, bidirectional SDPA with a 2D padding mask
  (``to_bidirectional(model, backend="torch")``), mean pooling over the mask;
* ``st b32`` / ``st b128``: sentence-transformers (when importable) on a folder holding the same weights, with its
  default mean pooling (its model is the plain causal decoder; only its speed is compared);
* ``ours``: ``LLM2Vec.encode`` with packed token-budget batches and the fused RMSNorm/gated-MLP ops — its default
  budget and ``--budgets`` values; ``ours default unfused`` (peer ``ours-unfused``): the same with HF's own RMSNorm
  and MLP forwards, which shows what :func:`llm2vec_fast.fuse_ops` gains.

Corpora (from ``$LLM2VEC_FAST_SHARED/data`` or ``--data-dir``): WikiText-2 test paragraphs (non-heading lines:
2,183 texts) and wiki1m sentences (first 8,000 lines). Models: ``smollm2`` (SmolLM2-135M-Instruct; real weights
when the default model resolves, else random weights from its config), ``llama-1.3b`` (hidden 2048, 24 layers,
16 heads, MLP 5504) and ``mistral-7b`` (hidden 4096, 32 layers, 32/8 heads, MLP 14336), both with random weights and
the SmolLM2 tokenizer (vocab 49152).

Reported per path: seconds, tokens/s and sentences/s (real tokens: no padding counted), MFU = 2 × non-embedding
parameters × real tokens / time / peak, where peak is a matmul measured in the same run (8192³ bf16 with
``do_bench`` on the GPU, best of ten 1024³ in the run's dtype on the CPU), peak GPU memory, ours' ratios to each
peer (tokens/s), and the minimum per-row cosine of each path's embeddings with ``hf-ref b32`` (ours computes the
same function: ≈ 1; sentence-transformers runs the causal decoder: lower). Each path is warmed up first (GPU: every
path on the whole corpus; CPU: 8 texts); timed figures are best-of ``--repeats``. (Until 2026-11-26 the GPU peers
warmed up on 256 texts only, so the first two H200 runs' peer figures may be low: take their ratios as upper bounds.)
Writes ``encode_<model>_<gpu|cpu>.{json,md}`` (+ ``.png`` when matplotlib is importable) into ``--out``,
else ``$OUT``, else benchmarks/results/. Targets (H100): 1.3B ≥ 60 % MFU on both corpora, 7B ≥ 75 %.
"""
import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

try:
    from benchmarks.common import DATA, RESULTS_DIR, bench_gpu, environment, profile_breakdown, write_results
except ImportError:  # run as `python benchmarks/bench_encode.py`: the repository root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import DATA, RESULTS_DIR, bench_gpu, environment, profile_breakdown, write_results

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TOKENIZER = ROOT / ".cache" / "device" / "smollm2"  # made by benchmarks/prepare_device.py
MAX_LENGTH = 512
CORPORA = ("wikitext", "wiki1m")
WIKI1M_LINES = 8000
# random-weight configs of the issue (vocab: the SmolLM2 tokenizer's)
CONFIGS = {
    "llama-1.3b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, intermediate_size=5504, vocab_size=49152, rope_theta=10000.0,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=49152, rope_theta=1e6,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None),
    # a 2-layer toy for smoke runs of this script (checks every path in seconds; its figures mean nothing)
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=49152, rope_theta=10000.0,
                 max_position_embeddings=1024, rms_norm_eps=1e-5),
}
MODELS = ("smollm2", *CONFIGS)
TARGET_MFU = {"llama-1.3b": 0.60, "mistral-7b": 0.75}


# ---------------------------------------------------------------------------------------------------- corpora
def load_corpus(name: str, data_dir: Path = DATA, limit: int | None = None) -> list[str]:
    """``wikitext``: WikiText-2 test paragraphs (non-empty, non-heading lines); ``wiki1m``: first 8,000 lines."""
    if name == "wikitext":
        path = data_dir / "wiki_text" / "wikitext-2-raw.wiki.test.raw"
        with open(path, encoding="utf-8") as f:
            texts = [s for s in (line.strip() for line in f) if s and not s.startswith("=")]
    elif name == "wiki1m":
        path = data_dir / "wiki_text" / "wiki1m_for_simcse.head1280000B.txt"
        with open(path, encoding="utf-8") as f:
            texts = [s for s in (line.strip() for line in f) if s][:WIKI1M_LINES]
    else:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    return texts[:limit] if limit else texts


# ---------------------------------------------------------------------------------------------------- models
def tokenizer_folder(arg: str | None) -> Path:
    """``--tokenizer``, else the device bundle's SmolLM2 folder, else the resolved default model."""
    if arg:
        return Path(arg)
    if (DEVICE_TOKENIZER / "tokenizer.json").exists():
        return DEVICE_TOKENIZER
    from llm2vec_fast import resolve_model

    return Path(resolve_model(None))


def build_model(name: str, tok_dir: Path, device: torch.device, dtype: torch.dtype):
    """(base HF model in eval mode on ``device``, weights note). Random weights are created on the device."""
    from transformers import AutoConfig, AutoModel

    if name == "smollm2":
        try:
            from llm2vec_fast import resolve_model

            folder = Path(resolve_model(None))
            model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
            return model.to(device).eval(), f"real (SmolLM2-135M-Instruct, {folder.name})"
        except (ImportError, FileNotFoundError, OSError) as e:  # no GGUF package there: same shapes, random weights
            config = AutoConfig.from_pretrained(tok_dir)
            note = f"random (SmolLM2-135M config; real weights unavailable: {type(e).__name__})"
    else:
        spec = dict(CONFIGS[name])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        note = "random"
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a config copied from a GGUF conversion still names it
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), note


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


# ---------------------------------------------------------------------------------------------------- peak
def matmul_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """FLOP/s of one large matmul in ``dtype``, measured now (the MFU denominator)."""
    if device.type == "cuda":
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        ms = bench_gpu(lambda: a @ b)
        del a, b
        return 2 * n**3 / (ms * 1e-3), f"{n}³ {str(dtype).removeprefix('torch.')} matmul, do_bench median"
    n = 1024
    a, b = (torch.randn(n, n, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    # best, not median: a peak; on a shared CPU other processes only ever slow it down
    return 2 * n**3 / min(times), f"{n}³ {str(dtype).removeprefix('torch.')} matmul, best of 10 at start and end"


# ---------------------------------------------------------------------------------------------------- paths
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_reference_encode(model, tokenizer, texts, batch_size, device, max_length=MAX_LENGTH):
    """The original llm2vec loop: sort by text length (longest first), pad per batch, bidirectional SDPA, mean."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        emb = (hidden * m).sum(1) / m.sum(1)
        out[torch.as_tensor(idx)] = emb.float().cpu()
    return out


def timed(fn, device, repeats):
    """(best seconds, peak GPU GiB or None, last result)."""
    best, result = float("inf"), None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return best, peak, result


def profile_encode(l2v, texts, device, corpus: str, top: int = 12) -> tuple[list[dict], dict]:
    """One ``encode`` pass under torch.profiler: (rows for the kernels taking the most device time, summary).

    The summary holds the wall time, the device-busy time (the kernels' own times summed; encode runs on one stream,
    so they do not overlap) and the host time spent tokenizing (on the packing thread, overlapping the device).
    Busy well under wall means the host (tokenizer, launches, syncs) holds the device back; busy near wall means the
    kernels listed are the ones to speed up.
    """
    from torch.profiler import ProfilerActivity, profile

    spent = [0.0]
    real = l2v.tokenize_items

    def tokenize_items(pairs):
        t = time.perf_counter()
        try:
            return real(pairs)
        finally:
            spent[0] += time.perf_counter() - t

    l2v.tokenize_items = tokenize_items
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        sync(device)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            l2v.encode(texts, show_progress_bar=False, convert_to_numpy=True)
            sync(device)
        wall = time.perf_counter() - t
    finally:
        del l2v.tokenize_items
    rows, class_rows, busy = profile_breakdown(prof, wall, top, corpus=corpus)
    rows += [{**r, "kernel": f"[class] {r['class']}"} for r in class_rows]
    summary = {"corpus": corpus, "wall_s": wall, "device_busy_s": busy, "busy_over_wall": busy / wall,
               "tokenize_s": spent[0]}
    print(f"  {corpus:9s} profile: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%}), tokenizing "
          f"{spent[0]:.3f} s on the packing thread", flush=True)
    return rows, summary


def row_cosines(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def sentence_transformer(model, tokenizer, device, dtype, workdir: Path):
    """A SentenceTransformer (mean pooling) over a folder holding ``model``'s weights, or (None, why)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        return None, f"sentence-transformers not importable ({e.__class__.__name__})"
    folder = Path(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or workdir / "-")
    if not (folder / "config.json").exists():  # random weights: write them where ST can load them
        folder = workdir / "st_model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    try:
        st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"dtype": dtype})
    except TypeError:  # older releases spell it torch_dtype
        st = SentenceTransformer(str(folder), device=str(device), model_kwargs={"torch_dtype": dtype})
    st.max_seq_length = MAX_LENGTH
    return st, None


# ---------------------------------------------------------------------------------------------------- run
def bench_corpus(ctx: dict, corpus: str, texts: list[str]) -> list[dict]:
    """Time every requested path on ``texts``; rows with tokens/s, MFU, memory, ratios and cosines."""
    from llm2vec_fast import fuse_ops, to_bidirectional, unfuse_ops
    from llm2vec_fast.encoder import default_batch_tokens

    model, tokenizer, l2v, st, device = ctx["model"], ctx["tokenizer"], ctx["l2v"], ctx["st"], ctx["device"]
    on_gpu, repeats = device.type == "cuda", ctx["repeats"]
    # GPU: every path warms up on the whole corpus (cuBLAS picks, allocator growth and compiles for every shape the
    # timed pass meets; a 256-text warm-up left the first peer's timed pass 35 % slow on an H200); CPU: nothing to
    # compile, a token warm-up suffices
    warm = texts if on_gpu else texts[:8]
    ref_tokens = int(sum(len(x) for x in tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]))
    our_tokens = int(l2v.tokenize(texts)["cu_seqlens"][-1])
    base = {"model": ctx["model_name"], "corpus": corpus, "texts": len(texts),
            "dtype": str(ctx["dtype"]).removeprefix("torch.")}
    rows, embeddings = [], {}

    def record(path, batch, seconds, mem, tokens, emb):
        embeddings[path] = emb
        mfu = 2 * ctx["n_params"] * tokens / seconds / ctx["peak"]
        rows.append({**base, "path": path, "batch": batch, "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "sentences_per_s": len(texts) / seconds, "mfu": mfu, "peak_mem_gib": mem,
                     "avg_tokens": tokens / len(texts)})
        print(f"  {corpus:9s} {path:16s} {tokens / seconds:12,.0f} tok/s  {mfu:6.1%} MFU", flush=True)

    if "hf" in ctx["peers"]:
        unfuse_ops(model)
        to_bidirectional(model, backend="torch")
        for bs in ctx["batch_sizes"]:
            hf_reference_encode(model, tokenizer, warm, bs, device)
            s, mem, emb = timed(lambda bs=bs: hf_reference_encode(model, tokenizer, texts, bs, device), device,
                                repeats)
            record(f"hf-ref b{bs}", bs, s, mem, ref_tokens, emb)
    if st is not None:
        for bs in ctx["batch_sizes"]:
            st.encode(warm, batch_size=bs, show_progress_bar=False)
            s, mem, emb = timed(lambda bs=bs: st.encode(texts, batch_size=bs, show_progress_bar=False,
                                                        convert_to_numpy=True), device, repeats)
            record(f"st b{bs}", bs, s, mem, ref_tokens, emb)
    ours = [(b, True) for b in ctx["budgets"]] if "ours" in ctx["peers"] else []
    if "ours-unfused" in ctx["peers"]:
        ours.append((None, False))  # HF's RMSNorm and MLP forwards: what fuse_ops gains
    for budget, fused in ours:
        to_bidirectional(model, backend=ctx["attn_backend"])
        if fused:
            fuse_ops(model)
        else:
            unfuse_ops(model)

        def enc(budget=budget):
            return l2v.encode(texts, show_progress_bar=False, max_batch_tokens=budget, convert_to_numpy=True)
        l2v.encode(warm, show_progress_bar=False, max_batch_tokens=budget)
        s, mem, emb = timed(enc, device, repeats)
        label = ("ours default" if budget is None else f"ours {budget // 1024}k tok") + ("" if fused else " unfused")
        # the default budget as encode() chose it (free memory is read after the warm-up, as encode() did)
        default = default_batch_tokens(model.config, l2v.device, l2v.max_length, dtype=next(model.parameters()).dtype)
        record(label, budget or default, s, mem, our_tokens, emb)

    if ctx.get("profile") and ours:
        to_bidirectional(model, backend=ctx["attn_backend"])
        fuse_ops(model)
        prof_rows, summary = profile_encode(l2v, texts, device, corpus)
        ctx["profiles"].append((prof_rows, summary))

    ref_key = f"hf-ref b{ctx['batch_sizes'][0]}"
    for r in rows:
        if ref_key in embeddings:
            r[f"min_cos_vs_{ref_key.replace(' ', '_')}"] = row_cosines(embeddings[r["path"]], embeddings[ref_key])
        if r["path"].startswith("ours"):
            for peer in rows:
                if not peer["path"].startswith("ours"):
                    r[f"x_vs_{peer['path'].replace(' ', '_')}"] = r["tokens_per_s"] / peer["tokens_per_s"]
    return rows


def run(args) -> Path:
    from transformers import AutoTokenizer

    from llm2vec_fast import LLM2Vec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    on_gpu = device.type == "cuda"
    limit = args.limit if args.limit is not None else (None if on_gpu else 32)
    repeats = args.repeats or 1
    budgets = [None, *(args.budgets if args.budgets is not None else ([65536, 131072] if on_gpu else [4096]))]
    batch_sizes = args.batch_sizes or [32, 128]
    peers = set(args.peers.split(","))
    data_dir = Path(args.data_dir) if args.data_dir else DATA
    corpora = list(CORPORA) if args.corpus == "all" else [args.corpus]

    tok_dir = tokenizer_folder(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peak, peak_how = matmul_peak(device, dtype)
    model, weights = build_model(args.model, tok_dir, device, dtype)
    n_params = non_embedding_params(model)
    l2v = LLM2Vec(model, tokenizer, pooling_mode="mean", max_length=MAX_LENGTH, doc_max_length=MAX_LENGTH)
    workdir = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    st, st_note = (None, "not requested") if "st" not in peers else sentence_transformer(
        model, tokenizer, device, dtype, workdir)

    ctx = dict(model=model, tokenizer=tokenizer, l2v=l2v, st=st, device=device, dtype=dtype, peers=peers,
               batch_sizes=batch_sizes, budgets=budgets, repeats=repeats, n_params=n_params, peak=peak,
               attn_backend=args.attn_backend, model_name=args.model, profile=args.profile, profiles=[])
    name = args.name or f"encode_{args.model}_{'gpu' if on_gpu else 'cpu'}"
    out_dir = args.out or os.environ.get("OUT") or RESULTS_DIR

    def write(rows):
        notes = summary_notes(args.model, rows, n_params, peak, peak_how, weights, st_note, limit, repeats, device)
        columns = ["model", "corpus", "texts", "avg_tokens", "path", "batch", "dtype", "seconds", "tokens_per_s",
                   "sentences_per_s", "mfu", "peak_mem_gib"]
        columns += sorted({k for r in rows for k in r if k.startswith(("x_vs_", "min_cos_"))})
        path = write_results(name, rows, out_dir=out_dir, columns=columns,
                             title=f"Encode throughput: {args.model} ({'GPU' if on_gpu else 'CPU'})", notes=notes)
        plot(rows, Path(out_dir) / f"{name}.png", f"{args.model} · {environment()['card']}")
        if ctx["profiles"]:
            prof_rows = [r for rows_, _ in ctx["profiles"] for r in rows_]
            lines = [f"{s['corpus']}: wall {s['wall_s']:.3f} s, device busy {s['device_busy_s']:.3f} s "
                     f"({s['busy_over_wall']:.0%} of wall), tokenizing {s['tokenize_s']:.3f} s on the packing thread."
                     for _, s in ctx["profiles"]]
            write_results(f"encode_profile_{args.model}_{'gpu' if on_gpu else 'cpu'}", prof_rows, out_dir=out_dir,
                          title=f"Encode profile: {args.model}, ours default (one pass under torch.profiler)",
                          notes="\n\n".join(lines) + "\n\nDevice busy = the kernels' own times summed (one stream). "
                          "Profiling slows the host a little.")
        return path

    rows = []
    try:
        for corpus in corpora:
            rows += bench_corpus(ctx, corpus, load_corpus(corpus, data_dir, limit))
            gc.collect()
            if on_gpu:  # written after each corpus: a run cut short by a time limit keeps the corpora it finished
                write(rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # a saved copy of the weights for sentence-transformers
    if not on_gpu:
        # a CPU shared with other work gives a low first reading; the peak is the best of two, start and end
        peak = max(peak, matmul_peak(device, dtype)[0])
        for r in rows:
            r["mfu"] = 2 * n_params * r["tokens_per_s"] / peak
    path = write(rows)
    print(Path(path).with_suffix(".md").read_text())
    return path


def summary_notes(model, rows, n_params, peak, peak_how, weights, st_note, limit, repeats, device) -> str:
    peak_text = f"{peak / 1e12:.1f} TFLOP/s" if peak >= 1e12 else f"{peak / 1e9:.1f} GFLOP/s"
    size = f"{n_params / 1e9:.3f} B" if n_params >= 1e8 else f"{n_params / 1e6:.2f} M"
    lines = [f"Non-embedding parameters {size}; weights {weights}. Peak {peak_text} "
             f"({peak_how}); dense limit {peak / (2 * n_params):,.0f} tok/s. Real tokens only (no padding); "
             f"max length {MAX_LENGTH}; best of {repeats} timed pass(es) after warm-up; peak memory includes the "
             f"weights. sentence-transformers: {st_note or 'mean pooling over the same weights (causal decoder)'}."]
    if limit:
        lines.append(f"Subsets: first {limit} texts of each corpus.")
    for corpus in sorted({r["corpus"] for r in rows}):
        ours = [r for r in rows if r["corpus"] == corpus and r["path"].startswith("ours")]
        peers = [r for r in rows if r["corpus"] == corpus and not r["path"].startswith("ours")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["tokens_per_s"])
        text = f"{corpus}: best ours = {best['path']} at {best['tokens_per_s']:,.0f} tok/s ({best['mfu']:.1%} MFU)"
        if peers:
            top = max(peers, key=lambda r: r["tokens_per_s"])
            text += f", {best['tokens_per_s'] / top['tokens_per_s']:.2f}× the best peer ({top['path']})"
        if model in TARGET_MFU and device.type == "cuda":
            goal = TARGET_MFU[model]
            text += f"; target ≥ {goal:.0%} MFU: {'met' if best['mfu'] >= goal else 'NOT met'}"
        lines.append(text + ".")
    return "\n\n".join(lines)


def plot(rows, path: Path, title: str) -> None:
    """Grouped bars of tokens/s per path and corpus; skipped quietly without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    corpora = sorted({r["corpus"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora, strict=True):
        vals = {r["path"]: r for r in rows if r["corpus"] == corpus}
        xs = [p for p in paths if p in vals]
        colors = ["tab:green" if p.startswith("ours") else "tab:gray" for p in xs]
        bars = ax.bar(range(len(xs)), [vals[p]["tokens_per_s"] / 1e3 for p in xs], color=colors)
        for b, p in zip(bars, xs, strict=True):
            ax.annotate(f"{vals[p]['mfu']:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(range(len(xs)), xs, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{corpus} ({vals[xs[0]]['texts']} texts)")
        ax.set_ylabel("k tokens/s (label: MFU)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- CLI
def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}") from e
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints, got {text!r}")
    return vals


def _peers(text: str) -> str:
    bad = set(text.split(",")) - {"hf", "st", "ours", "ours-unfused"}
    if bad:
        raise argparse.ArgumentTypeError(f"unknown peers {sorted(bad)}; expected a comma list of hf, st, ours, "
                                         "ours-unfused")
    return text


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", choices=MODELS, default="smollm2",
                   help="smollm2 (the default model), llama-1.3b or mistral-7b (random weights); tiny: a 2-layer "
                        "random Llama for smoke runs")
    p.add_argument("--corpus", choices=(*CORPORA, "all"), default="all",
                   help="wikitext (WikiText-2 test paragraphs), wiki1m (first 8,000 sentences) or all")
    p.add_argument("--limit", type=int, help="first N texts of each corpus (default: all on GPU, 32 on CPU)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: .cache/device/smollm2, else the default model)")
    p.add_argument("--data-dir", help="data folder (default: $LLM2VEC_FAST_SHARED/data or ../shared/data)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch-sizes", type=_positive_ints, help="peer batch sizes (default 32,128)")
    p.add_argument("--budgets", type=_positive_ints,
                   help="extra max_batch_tokens for ours, beside its default (default: 65536,131072 GPU; 4096 CPU)")
    p.add_argument("--peers", type=_peers, default="hf,st,ours",
                   help="paths to run: comma list of hf, st, ours, ours-unfused (ours with HF's RMSNorm and MLP)")
    p.add_argument("--attn-backend", default="auto", help="our attention backend (default auto)")
    p.add_argument("--repeats", type=int, help="timed passes per path, best kept (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="one more pass of ours (default budget) under torch.profiler per corpus: device-busy share "
                        "of wall time and the top kernels (encode_profile_<model>_<gpu|cpu>.md)")
    p.add_argument("--out", help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--name", help="result file stem (default encode_<model>_<gpu|cpu>)")
    return p


def add_bench_encode(subparsers):
    """Register ``encode`` under a ``bench`` sub-command group (``llm2vec-fast bench encode``)."""
    p = subparsers.add_parser("encode", help="encode throughput vs the HF reference path and sentence-transformers",
                              description=__doc__.split("\n\n")[0])
    configure_parser(p)
    p.set_defaults(func=lambda args: (run(args), 0)[1])
    return p


def main(argv=None) -> int:
    p = configure_parser(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
