"""The ``llm2vec-fast`` command line: encode, demo, and the eval / train / export-st / serve / bench families."""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ._io import iter_jsonl

DEMO_TEXTS = [
    "A man is playing a flute.",
    "Someone is playing a wind instrument.",
    "A cat is sleeping on the sofa.",
    "The stock market fell sharply on Monday.",
    ["Given a question, retrieve passages that answer it", "What instrument is the man playing?"],
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2vec-fast",
        description="Decoder LLMs as text encoders (LLM2Vec): encode, serve, evaluate, train, benchmark.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    enc = sub.add_parser("encode", help="embed texts", description=(
        "Embed texts given as arguments, in a file (--input) or on standard input (one text per line). "
        "Writes .npy or .jsonl (--output), or JSON lines on standard output."))
    enc.add_argument("texts", nargs="*", help="texts to embed (default: --input, else standard input)")
    enc.add_argument("--input", "-i", type=Path, help=".txt (one text per line; an empty line embeds to a zero "
                     "vector, keeping rows aligned with lines) or .jsonl with {\"text\": ..., \"instruction\": ...}")
    enc.add_argument("--output", "-o", type=Path, help=".npy (matrix, rows in input order) or .jsonl "
                     "({\"text\", \"embedding\"} per line), written atomically; or a folder (no suffix): inputs are "
                     "streamed in chunks to .npy shards plus manifest.json (\"complete\": false until done; a rerun "
                     "resumes). Default: JSON lines on stdout")
    enc.add_argument("--text-field", default="text", help="the field of a .jsonl input that holds the text "
                     "(default: text)")
    enc.add_argument("--chunk-size", type=int, default=100_000, help="rows per shard with --output FOLDER")
    enc.add_argument("--overwrite", action="store_true", help="with --output FOLDER: start afresh instead of "
                     "resuming (a folder holding other inputs or settings is refused otherwise)")
    _model_options(enc)
    enc.add_argument("--instruction", default="", help="instruction prepended to every text that has none of its "
                     "own; attended to but not pooled")
    enc.add_argument("--prompt-name", default=None, help="a named instruction stored with the model (e.g. query)")
    enc.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    enc.add_argument("--precision", default="float32", choices=["float32", "int8", "uint8", "binary", "ubinary"],
                     help="output precision (binary/ubinary: packed bits, ceil(dim/8) bytes per row)")
    enc.add_argument("--quantization-ranges", type=Path, default=None, metavar="FILE",
                     help="int8/uint8: per-dimension [min; max] from a .npy file of shape [2, dim] or a shard folder's "
                     "manifest.json (its quantization_ranges), so these embeddings share that scale; default: the "
                     "range of the texts encoded (of the first shard with --output FOLDER)")
    enc.add_argument("--truncate-dim", type=int, default=None, help="keep the first N dimensions (Matryoshka); "
                     "renormalised with --normalize")
    enc.add_argument("--batch-size", type=int, default=None, help="with max_length sets the token budget "
                     "(batch-size x max-length tokens per packed batch); default: the device's default budget "
                     "(32 x max-length on CPU; on CUDA sized to free memory, at most 65,536)")
    enc.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per packed batch")
    enc.add_argument("--devices", default=None, help="comma-separated devices for data-parallel encoding, one "
                     "worker process each (e.g. cuda:0,cuda:1,cuda:2,cuda:3)")
    enc.add_argument("--worker-load", default="share", choices=["share", "reload"], help="with --devices: send the "
                     "model through shared memory (share), or let each worker load it from disk (reload: for a small "
                     "/dev/shm, as in containers)")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    enc.set_defaults(func=cmd_encode)

    demo = sub.add_parser("demo", help="embed a few example texts with the default model and print similarities",
                          description="Embed example texts and print their cosine-similarity table.")
    _model_options(demo)
    demo.set_defaults(func=cmd_demo)

    # the other families import heavy modules (Trainer, scikit-learn, matplotlib): only the one asked for is built
    for name, (help_text, hooks) in FAMILIES.items():
        if command != name:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        if name == "bench":
            bench = sub.add_parser("bench", help=help_text, description="Benchmarks: encode throughput against "
                                   "peers, and the results report.")
            target = bench.add_subparsers(dest="bench_command", metavar="BENCH")
            target.required = True
        else:
            target = sub
        for module, func in hooks:
            _try_add(module, func, target)
        if name == "bench" and "encode" not in target.choices:
            # benchmarks/ lives in the source tree, not in an installed package: say so instead of a usage error
            target.add_parser("encode", help="encode throughput against peers (needs a source checkout)"
                              ).set_defaults(func=_bench_needs_checkout)
        if name not in sub.choices:  # its module could not be imported: say why instead of a bare usage error
            sub.add_parser(name, help=help_text).set_defaults(func=_missing_family(name, hooks))
    return parser


FAMILIES = {
    "eval": ("evaluate on local STS / retrieval / reranking / classification / pair-classification / clustering "
             "files",
             [("llm2vec_fast.evaluation", "add_subcommands")]),
    "train": ("train: mntp, simcse, supervised, scored", [("llm2vec_fast.training.cli", "add_subcommands")]),
    "mine": ("mine hard negatives for supervised training data", [("llm2vec_fast.mining", "add_subcommands")]),
    "export-st": ("save a model as a sentence-transformers folder", [("llm2vec_fast.st_export", "add_subcommands")]),
    "serve": ("serve embeddings over HTTP (TEI and OpenAI routes)", [("llm2vec_fast.server", "add_subcommands")]),
    "bench": ("benchmarks: encode throughput, results report",
              [("benchmarks.bench_encode", "add_bench_encode"), ("llm2vec_fast.report", "add_bench_report")]),
}


def _bench_needs_checkout(args):
    raise CLIError("'bench encode' runs benchmarks/bench_encode.py, which lives in the source tree of llm2vec_fast "
                   "and is not installed with the package: run it from a clone (python -m llm2vec_fast bench encode "
                   "... in its root, or python benchmarks/bench_encode.py)")


def _missing_family(name, hooks):
    def fail(args):
        import importlib

        for module, _ in hooks:
            importlib.import_module(module)  # re-raise the real import error
        raise CLIError(f"the {name!r} commands are unavailable")
    return fail


def _try_add(module, func, sub):
    """Subcommand families live beside their code; a family whose optional dependencies are missing is left out."""
    import importlib

    try:
        getattr(importlib.import_module(module), func)(sub)
    except (ImportError, AttributeError):
        if module.startswith("benchmarks."):
            root = str(Path(__file__).resolve().parent.parent)
            if root not in sys.path and (Path(root) / "benchmarks").is_dir():
                sys.path.insert(0, root)
                try:
                    getattr(importlib.import_module(module), func)(sub)
                except (ImportError, AttributeError):
                    pass


def _model_options(p):
    p.add_argument("--model", "-m", default=None, help="HF model folder or hub id; default: the embedded "
                   "SmolLM2-135M-Instruct ('smollm2-135m')")
    p.add_argument("--peft", default=None, help="LoRA adapter folder applied on top of --model")
    p.add_argument("--pooling", default=None, choices=["mean", "weighted_mean", "eos_token", "last_token",
                                                       "bos_token"], help="pooling mode (default: the model's "
                   "llm2vec_config.json, else mean)")
    p.add_argument("--no-bidirectional", action="store_true", help="keep causal attention")
    p.add_argument("--max-length", type=int, default=None, help="max tokens per text (default 512)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "torch", "triton", "flash_attn"],
                   help="attention implementation (default auto: Triton on CUDA)")


def load_model(args, **overrides):
    """``LLM2Vec.from_pretrained`` from the model options any subcommand has (absent ones take the defaults)."""
    from llm2vec_fast import LLM2Vec

    kw = dict(peft_model_name_or_path=getattr(args, "peft", None), pooling_mode=getattr(args, "pooling", None),
              enable_bidirectional=False if getattr(args, "no_bidirectional", False) else None,
              max_length=getattr(args, "max_length", None), attn_backend=getattr(args, "attn_backend", "auto"),
              device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    kw.update(overrides)
    if getattr(args, "no_progress", False) or getattr(args, "progress", None) is False:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bar too
    return LLM2Vec.from_pretrained(getattr(args, "model", None), **kw)


class CLIError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def read_inputs(args):
    """Texts from arguments, --input, or stdin; returns (items, display texts)."""
    if args.texts and args.input:
        raise CLIError("give texts as arguments or --input FILE, not both")
    if args.texts:
        texts = list(args.texts)
        return [[args.instruction, t] if args.instruction else t for t in texts], texts
    if args.input:
        return read_file(args.input, args.instruction, args.text_field)
    if sys.stdin is None or sys.stdin.isatty():
        raise CLIError("no input: give texts as arguments, --input FILE, or pipe text on standard input")
    # lines split as a file's are (iter_file): universal newlines (\r\n and \r end a line too; a POSIX stdin does not
    # translate them itself), then "\n" only, so that rows match lines
    texts = sys.stdin.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    return [[args.instruction, t] if args.instruction else t for t in texts], texts


def read_file(path: Path, instruction: str = "", text_field: str = "text"):
    """All items of a .txt / .jsonl file: (items, texts)."""
    pairs = list(iter_file(path, instruction, text_field))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def iter_file(path: Path, instruction: str = "", text_field: str = "text"):
    """Lazily yield (item, text) from a .txt (one text per line) or .jsonl file (the text in ``text_field``, an
    optional ``instruction``); errors name the line."""
    if not path.exists():
        raise CLIError(f"input file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt", ".text", ""):
        raise CLIError(f"unsupported input file type {suffix!r} for {str(path)!r}; expected .txt or .jsonl")
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            if suffix != ".jsonl":
                for line in f:
                    line = line.rstrip("\n")
                    yield ([instruction, line] if instruction else line), line
                return
            for n, row in iter_jsonl((line.rstrip("\n") for line in f), path):
                if not isinstance(row.get(text_field), str):
                    raise CLIError(f"{path}:{n}: expected an object with a string {text_field!r} field, got "
                                   f"{json.dumps(row)[:80]!r}")
                instr = row.get("instruction")
                instr = instruction if instr is None else instr  # null: none of its own, as when absent
                if not isinstance(instr, str):
                    raise CLIError(f"{path}:{n}: \"instruction\" must be a string, got {type(instr).__name__}")
                yield ([instr, row[text_field]] if instr else row[text_field]), row[text_field]
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read input file {str(path)!r}: {e}") from e


def write_output(path, emb, texts):
    """Write atomically: a failure never leaves a partial file under the final name."""
    import numpy as np

    if path is None:
        for t, e in zip(texts, emb, strict=True):
            # float32: each value's shortest decimal that reads back as the same float32 (numpy's str), so stdout
            # carries exactly what -o writes, in fewer digits
            vec = [float(str(x)) for x in e] if e.dtype.kind == "f" else e.tolist()
            sys.stdout.write(json.dumps({"text": t, "embedding": vec}) + "\n")
        return
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".jsonl"):
        raise CLIError(f"unsupported output type {suffix!r} for {str(path)!r}; expected .npy or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".npy":
                np.save(f, np.asarray(emb))
            else:
                for t, e in zip(texts, emb, strict=True):
                    f.write((json.dumps({"text": t, "embedding": e.tolist()}) + "\n").encode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_quantization_ranges(path, precision):
    """``--quantization-ranges``: a [2, dim] float array from a .npy file or a manifest.json, read before the model
    loads; None when not given."""
    import numpy as np

    if path is None:
        return None
    if precision not in ("int8", "uint8"):
        raise CLIError(f"--quantization-ranges applies to --precision int8 / uint8, not {precision}")
    if not path.is_file():
        raise CLIError(f"--quantization-ranges file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".json":
            ranges = json.loads(path.read_text()).get("quantization_ranges")
            if ranges is None:
                raise CLIError(f"{path} has no quantization_ranges (a manifest of an int8/uint8 shard folder has)")
            ranges = np.asarray(ranges, dtype=np.float32)
        else:
            ranges = np.load(path).astype(np.float32)
    except (OSError, ValueError, AttributeError) as e:
        raise CLIError(f"cannot read --quantization-ranges {str(path)!r}: {e}") from e
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise CLIError(f"--quantization-ranges must hold a [2, dim] array (minima; maxima), got shape "
                       f"{tuple(ranges.shape)}")
    return ranges


def cmd_encode(args) -> int:
    out = args.output
    to_folder = out is not None and (out.is_dir() or out.suffix == "")
    if to_folder and out.exists() and not out.is_dir():
        raise CLIError(f"--output {str(out)!r} is an existing file: a folder (no suffix) streams shards; give a new "
                       "folder, or a .npy / .jsonl file")
    if out is not None and not to_folder and out.suffix.lower() not in (".npy", ".jsonl"):
        raise CLIError(f"unsupported output type {out.suffix!r} for {str(out)!r}; expected .npy, .jsonl or a "
                       "folder")
    if to_folder:
        args._interrupt_note = (f"; the finished shards in {out} stay: the same command resumes from them "
                                "(--overwrite starts afresh)")
    if to_folder and args.input and not args.texts:
        # streamed: the input is never held in memory as a whole
        items, texts = (pair[0] for pair in iter_file(args.input, args.instruction, args.text_field)), None
        next(iter_file(args.input, args.instruction, args.text_field), None)  # fail fast: missing / unreadable
    else:
        items, texts = read_inputs(args)
    ranges = read_quantization_ranges(args.quantization_ranges, args.precision)
    if args.precision in ("int8", "uint8") and ranges is None and texts is not None and len(texts) < 2:
        raise CLIError(f"--precision {args.precision} takes each dimension's range from the texts encoded together, "
                       f"and {len(texts)} text gives none: pass --quantization-ranges FILE (a [2, dim] .npy, or the "
                       "manifest.json of an int8/uint8 shard folder)")
    model = load_model(args)
    kw = dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, prompt_name=args.prompt_name,
              normalize_embeddings=args.normalize, precision=args.precision, truncate_dim=args.truncate_dim)
    if ranges is not None:
        kw["quantization_ranges"] = ranges
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    if devices:
        kw["pool"] = model.start_multi_process_pool(devices, load=args.worker_load)
    try:
        if to_folder:
            try:
                manifest = model.encode_to_disk(items, out, chunk_size=args.chunk_size, resume=not args.overwrite,
                                                show_progress_bar=not args.no_progress, **kw)
            except ValueError as e:
                raise CLIError(str(e).replace("resume=False", "--overwrite")) from e
            print(f"wrote {manifest['rows']} embeddings in {len(manifest['shards'])} shard(s) to {out}",
                  file=sys.stderr)
            return 0
        emb = model.encode(items, convert_to_numpy=True, show_progress_bar=not args.no_progress and len(items) > 64,
                           **kw)
    finally:
        if devices:
            kw["pool"].close()
    write_output(out, emb, texts)
    if args.output is not None:
        width = (f"{emb.shape[1]} bytes (packed bits, one per dimension)" if args.precision in ("binary", "ubinary")
                 else f"{emb.shape[1]}")
        print(f"wrote {len(texts)} embeddings of width {width} to {args.output}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    import numpy as np

    model = load_model(args)
    emb = model.encode(DEMO_TEXTS, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    sim = emb @ emb.T
    labels = [t if isinstance(t, str) else f"[{t[0][:18]}…] {t[1]}" for t in DEMO_TEXTS]
    print(f"model: {model.model.config._name_or_path}  pooling: {model.pooling_mode}  width: {emb.shape[1]}")
    for i, label in enumerate(labels):
        print(f"  [{i}] {label}")
    print("cosine similarity:")
    print("      " + "".join(f"[{j}]".rjust(7) for j in range(len(labels))))
    for i in range(len(labels)):
        print(f"  [{i}] " + "".join(f"{sim[i, j]:7.3f}" for j in range(len(labels))))
    best = int(np.argsort(-sim[0])[1])
    print(f"closest to [0]: [{best}] {labels[best]}")
    if not args.no_bidirectional:
        print("note: bidirectional attention on an untrained decoder blurs similarities (the LLM2Vec paper's "
              "finding); MNTP then SimCSE training (`llm2vec-fast train ...`) recovers and improves them.")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "train":
        from .training.original_config import ConfigError, expand_config

        try:
            argv = expand_config(argv)  # --config FILE.json: an original llm2vec training config, as flags
        except ConfigError as e:
            print(f"llm2vec-fast: error: {e}", file=sys.stderr)
            return 2
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "func", None) is not _bench_needs_checkout:
        parser.parse_args(argv)  # argparse's own error for the unknown arguments
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"llm2vec-fast: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, ModuleNotFoundError) as e:
        # OSError: a missing file, a model id that is neither a folder here nor reachable, a busy port, a full disk
        print(f"llm2vec-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm2vec-fast: interrupted{getattr(args, '_interrupt_note', '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
