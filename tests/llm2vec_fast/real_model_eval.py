"""The real default model for the evaluation / drop-in tests, loaded once per test session (loading takes ~20 s).

While the cached default-model folder still carries the GGUF ``quantization_config`` in its config.json (which makes
``save_pretrained`` refuse the model), a clean copy without it is made once in a temporary folder.
"""
import functools
import json
import shutil
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=1)
def default_model_dir() -> str:
    from llm2vec_fast import resolve_model

    src = Path(resolve_model(None))
    cfg = json.loads((src / "config.json").read_text())
    if "quantization_config" not in cfg:
        return str(src)
    dst = Path(tempfile.mkdtemp(prefix="llm2vec_fast_eval_model_"))
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            try:
                (dst / f.name).symlink_to(f)
            except OSError:
                shutil.copy2(f, dst / f.name)
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst)


@functools.lru_cache(maxsize=1)
def default_model():
    """``LLM2Vec.from_pretrained`` of the default model in float32 on the CPU (shared: do not mutate)."""
    from llm2vec_fast import LLM2Vec

    return LLM2Vec.from_pretrained(default_model_dir(), device="cpu", dtype="float32")
