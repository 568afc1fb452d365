"""Save an LLM2Vec model as a sentence-transformers folder, and read such a folder back.

``save_sentence_transformers(l2v, path)`` writes one folder that both libraries load:

- ``LLM2Vec.save`` output in the root: ``config.json`` + weights + tokenizer files + ``llm2vec_config.json``
  (pooling mode, lengths, ``skip_instruction``, bidirectional flag, named prompts), so
  ``LLM2Vec.from_pretrained(path)`` reloads it as any saved LLM2Vec folder;
- ``modules.json``: a single module, :class:`llm2vec_fast.st_module.LLM2VecSTModule`, which tokenizes, runs the
  bidirectional model and pools exactly as ``LLM2Vec.encode``;
- ``config_sentence_transformers.json``: the named prompts (``encode_query`` uses ``"query"``, ``encode_document``
  ``"document"``), cosine similarity.

Loading::

    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(path, trust_remote_code=True)

``trust_remote_code=True`` is required: sentence-transformers ≥ 6 refuses to import any module class outside its own
namespace without it, even from a local folder (the class here comes from the installed ``llm2vec_fast`` package;
nothing is downloaded or copied into the folder). Needs ``llm2vec_fast`` installed where the folder is loaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MODULE_CLASS = "llm2vec_fast.st_module.LLM2VecSTModule"
LLM2VEC_CONFIG = "llm2vec_config.json"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("sentence-transformers", "transformers", "torch", "llm2vec_fast"):
        try:
            out[name.replace("-", "_")] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def save_sentence_transformers(l2v, path, prompts: dict | None = None, default_prompt_name: str | None = None):
    """Write ``l2v`` as a folder that ``SentenceTransformer(path, trust_remote_code=True)`` loads.

    Args:
        l2v: an :class:`llm2vec_fast.LLM2Vec`.
        path: output folder (created; files of the same names are overwritten).
        prompts: named instructions for sentence-transformers (``{"query": "Given a question, retrieve ..."}``);
            default: the model's own ``l2v.prompts``. They are also stored with the model, so
            ``LLM2Vec.from_pretrained(path).prompts`` has them.
        default_prompt_name: a prompt applied when ``encode`` gets none (default: none).

    Returns the folder as a ``Path``. Works without sentence-transformers installed (only loading needs it).
    """
    path = Path(path)
    prompts = dict(prompts if prompts is not None else (getattr(l2v, "prompts", None) or {}))
    for k, v in prompts.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"prompts must map str to str, got {k!r}: {v!r}")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(prompts)}")
    old = getattr(l2v, "prompts", None)
    l2v.prompts = prompts  # LLM2Vec.save stores l2v.prompts in llm2vec_config.json
    try:
        l2v.save(str(path))
    finally:
        l2v.prompts = old if old is not None else {}
    (path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": MODULE_CLASS}], indent=2))
    (path / "config_sentence_transformers.json").write_text(json.dumps({
        "model_type": "SentenceTransformer",
        "__version__": _versions(),
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }, indent=2))
    return path


def is_st_folder(path) -> bool:
    """True when ``path`` is a folder written by :func:`save_sentence_transformers`."""
    modules = Path(path) / "modules.json"
    if not modules.is_file():
        return False
    try:
        entries = json.loads(modules.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(isinstance(e, dict) and e.get("type") == MODULE_CLASS for e in entries)


def load_st_folder(path) -> tuple[str, dict]:
    """``(model folder, llm2vec config dict)`` for a folder written by :func:`save_sentence_transformers`.

    The model lives in the folder's root, so the first element is ``path`` itself; ``LLM2Vec.from_pretrained(path)``
    needs no special handling. Raises ``ValueError`` for a sentence-transformers folder not written by us.
    """
    path = Path(path)
    if not is_st_folder(path):
        raise ValueError(f"{str(path)!r} is not a folder written by save_sentence_transformers (its modules.json "
                         f"does not name {MODULE_CLASS})")
    cfg_path = path / LLM2VEC_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} missing: the folder is incomplete")
    from .encoder import _read_config

    return os.fspath(path), _read_config(path)  # llm2vec_config.json and the extra settings beside it


# ---------------------------------------------------------------------- CLI
def add_subcommands(subparsers):
    """Add ``export-st`` (``llm2vec-fast export-st --output DIR [--model M] ...``); sets ``func``."""
    p = subparsers.add_parser(
        "export-st", help="save a model as a sentence-transformers folder",
        description="Write a folder that SentenceTransformer(path, trust_remote_code=True) loads with bidirectional "
                    "attention, the model's pooling and instructions excluded from pooling; LLM2Vec.from_pretrained "
                    "loads it too.")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M)")
    p.add_argument("--peft", default=None, help="LoRA adapter applied on top of --model (merged before saving)")
    p.add_argument("--pooling", default=None, choices=["mean", "weighted_mean", "eos_token", "last_token",
                                                       "bos_token"], help="pooling mode (default: the model's)")
    p.add_argument("--no-bidirectional", action="store_true", help="keep causal attention")
    p.add_argument("--query-prompt", default=None, help="instruction stored as the 'query' prompt")
    p.add_argument("--document-prompt", default=None, help="instruction stored as the 'document' prompt")
    p.add_argument("--dtype", default=None, help="weights dtype to save (default float32)")
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    """Run ``export-st`` from parsed args; prints the folder as the last line; returns 0."""
    from .cli import load_model

    # exported on the CPU in fp32, adapters merged: the folder is plain weights
    l2v = load_model(args, device="cpu", dtype=args.dtype or "float32", merge_peft=bool(getattr(args, "peft", None)))
    prompts = dict(getattr(l2v, "prompts", None) or {})
    if args.query_prompt is not None:
        prompts["query"] = args.query_prompt
    if args.document_prompt is not None:
        prompts["document"] = args.document_prompt
    path = save_sentence_transformers(l2v, args.output, prompts=prompts)
    print(path)
    return 0
