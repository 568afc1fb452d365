"""The llm2vec-fast command line: inputs, outputs, errors, and no partial files."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from llm2vec_fast.cli import main


def run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_args(tiny_encoder_dir):
    return ["--model", str(tiny_encoder_dir), "--device", "cpu"]


def test_encode_arguments_to_stdout(model_args, capsys, tmp_path):
    code, out, _ = run(["encode", "hello world", "second text", *model_args], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["hello world", "second text"]
    assert len(rows[0]["embedding"]) == 64
    # the printed decimals read back as exactly the float32 values -o writes
    code, _, _ = run(["encode", "hello world", "second text", "-o", str(tmp_path / "e.npy"), *model_args], capsys)
    assert np.array_equal(np.array([r["embedding"] for r in rows], dtype=np.float32), np.load(tmp_path / "e.npy"))


def test_encode_txt_to_npy_matches_api(model_args, tiny_encoder_dir, tmp_path, capsys):
    from llm2vec_fast import LLM2Vec

    src = tmp_path / "in.txt"
    src.write_text("first line\n\nthird line after an empty one\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    code, _, err = run(["encode", "--input", str(src), "--output", str(out), "--normalize", *model_args], capsys)
    emb = np.load(out)
    assert code == 0 and emb.shape == (3, 64) and "wrote 3 embeddings" in err
    assert np.allclose(emb[1], 0)  # the empty line keeps its row, as a zero vector
    api = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu").encode(
        ["first line", "", "third line after an empty one"], normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=False)
    assert np.allclose(emb, api, atol=1e-6)


def test_encode_jsonl_with_instructions(model_args, tiny_encoder_dir, tmp_path, capsys):
    from llm2vec_fast import LLM2Vec

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a query", "instruction": "Retrieve passages"}) + "\n" +
                   json.dumps({"text": "a document"}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert run(["encode", "-i", str(src), "-o", str(out), *model_args], capsys)[0] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    api = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu").encode(
        [["Retrieve passages", "a query"], "a document"], convert_to_numpy=True, show_progress_bar=False)
    assert np.allclose(np.array([r["embedding"] for r in rows]), api, atol=1e-6)


def test_stdin_and_global_instruction(model_args, capsys, monkeypatch):
    code, out, _ = run(["encode", "--instruction", "Classify", *model_args], capsys, stdin="one\ntwo\n",
                       monkeypatch=monkeypatch)
    assert code == 0 and len(out.splitlines()) == 2


def test_stdin_rows_match_lines_as_a_file_does(model_args, tmp_path, capsys, monkeypatch):
    # a form feed and U+2028 inside a line: str.splitlines() would cut there, a file's lines do not
    text = "a\x0cb\nc\u2028d\n\nlast"
    code, out, _ = run(["encode", *model_args], capsys, stdin=text, monkeypatch=monkeypatch)
    from_stdin = [json.loads(line)["text"] for line in out.splitlines()]
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    code2, out2, _ = run(["encode", "-i", str(src), *model_args], capsys)
    assert code == code2 == 0 and from_stdin == [json.loads(line)["text"] for line in out2.splitlines()]
    assert from_stdin == ["a\x0cb", "c\u2028d", "", "last"]


def test_jsonl_null_instruction_takes_the_global_one(model_args, tmp_path, capsys):
    from llm2vec_fast.cli import read_file

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a", "instruction": null}\n{"text": "b", "instruction": ""}\n{"text": "c"}\n'
                   '{"text": "d", "instruction": "Own"}\n')
    items, _ = read_file(src, "Global")
    assert items == [["Global", "a"], "b", ["Global", "c"], ["Own", "d"]]


def test_jsonl_text_field(model_args, tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"content": "first doc", "id": 1}\n{"content": "second doc", "instruction": "Represent"}\n')
    code, out, _ = run(["encode", "-i", str(src), "--text-field", "content", *model_args], capsys)
    assert code == 0 and [json.loads(x)["text"] for x in out.splitlines()] == ["first doc", "second doc"]
    code, _, err = run(["encode", "-i", str(src), *model_args], capsys)
    assert code == 2 and "docs.jsonl:1: expected an object with a string 'text' field" in err


def test_existing_file_as_folder_output_and_bad_device(model_args, tmp_path, capsys):
    (tmp_path / "plain").write_text("keep me")
    code, _, err = run(["encode", "x", "-o", str(tmp_path / "plain"), *model_args], capsys)
    assert code == 2 and "is an existing file" in err and (tmp_path / "plain").read_text() == "keep me"
    code, _, err = run(["encode", "x", "--model", model_args[1], "--device", "tpu"], capsys)
    assert code == 2 and "'tpu' is not a device" in err


@pytest.mark.parametrize("content, suffix, message", [
    ('{"text": "ok"}\nnot json\n', ".jsonl", r"in.jsonl:2: not valid JSON"),
    ('{"txt": "wrong key"}\n', ".jsonl", r"in.jsonl:1: expected an object with a string 'text' field"),
    ("a,b\n", ".csv", r"unsupported input file type '.csv'"),
])
def test_malformed_input_files(model_args, tmp_path, capsys, content, suffix, message):
    import re

    src = tmp_path / f"in{suffix}"
    src.write_text(content)
    out = tmp_path / "out.npy"
    code, _, err = run(["encode", "-i", str(src), "-o", str(out), *model_args], capsys)
    assert code == 2 and re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_missing_input_bad_output_and_model(model_args, tmp_path, capsys):
    code, _, err = run(["encode", "-i", str(tmp_path / "missing.txt"), *model_args], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["encode", "x", "-o", str(tmp_path / "out.csv"), *model_args], capsys)
    assert code == 2 and "unsupported output type '.csv'" in err and not (tmp_path / "out.csv").exists()
    code, _, err = run(["encode", "x", "--model", str(tmp_path / "no-model")], capsys)
    assert code == 2 and "not found" in err


def test_failure_during_encoding_leaves_no_file(model_args, tmp_path, capsys, monkeypatch):
    from llm2vec_fast import LLM2Vec

    def boom(*a, **k):
        raise ValueError("simulated failure")

    monkeypatch.setattr(LLM2Vec, "encode", boom)
    out = tmp_path / "out.npy"
    code, _, err = run(["encode", "x", "-o", str(out), *model_args], capsys)
    assert code == 2 and "simulated failure" in err and not out.exists()


def test_help_explains_options():
    res = subprocess.run([sys.executable, "-m", "llm2vec_fast.cli", "encode", "--help"], capture_output=True,
                         text=True, check=True)
    for option in ("--input", "--output", "--model", "--pooling", "--instruction", "--normalize",
                   "--max-batch-tokens", "--batch-size", "--device", "--dtype"):
        assert option in res.stdout
    # python -m llm2vec_fast is the same command line
    top = subprocess.run([sys.executable, "-m", "llm2vec_fast", "--help"], capture_output=True, text=True, check=True)
    assert "encode" in top.stdout and "mine" in top.stdout


def test_bench_encode_without_a_source_checkout_says_so(monkeypatch, capsys):
    """An installed package ships no benchmarks/: 'bench encode' explains that instead of a usage error."""
    import llm2vec_fast.cli as cli

    real = cli._try_add
    monkeypatch.setattr(cli, "_try_add", lambda module, func, sub: None if module.startswith("benchmarks.")
                        else real(module, func, sub))
    code, _, err = run(["bench", "encode", "--model", "smollm2"], capsys)
    assert code == 2 and "'bench encode' runs benchmarks/bench_encode.py" in err and "from a clone" in err


def test_stream_to_folder_and_resume(model_args, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i}\n" for i in range(21)))
    out = tmp_path / "shards"
    code, _, err = run(["encode", "-i", str(src), "-o", str(out), "--chunk-size", "8", *model_args], capsys)
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and manifest["complete"] and manifest["rows"] == 21 and len(manifest["shards"]) == 3
    full = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    code, _, _ = run(["encode", "-i", str(src), "-o", str(tmp_path / "all.npy"), *model_args], capsys)
    assert np.allclose(full, np.load(tmp_path / "all.npy"), atol=1e-6)
    # an interrupted run resumes: a present shard is kept as is
    stamp = (out / "embeddings-00000.npy").stat().st_mtime_ns
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "embeddings-00002.npy").unlink()
    assert run(["encode", "-i", str(src), "-o", str(out), "--chunk-size", "8", *model_args], capsys)[0] == 0
    assert (out / "embeddings-00000.npy").stat().st_mtime_ns == stamp and (out / "embeddings-00002.npy").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"]
    # other settings: refused with the flag that starts afresh, which then rewrites the folder
    code, _, err = run(["encode", "-i", str(src), "-o", str(out), "--chunk-size", "5", *model_args], capsys)
    assert code == 2 and "use another folder or --overwrite" in err
    code, _, _ = run(["encode", "-i", str(src), "-o", str(out), "--chunk-size", "5", "--overwrite", *model_args],
                     capsys)
    assert code == 0 and len(json.loads((out / "manifest.json").read_text())["shards"]) == 5
    assert len(list(out.glob("embeddings-*.npy"))) == 5


def test_precision_and_truncation_options(model_args, tmp_path, capsys):
    out = tmp_path / "bits.npy"
    code, _, _ = run(["encode", "one", "two", "three", "-o", str(out), "--precision", "ubinary", *model_args], capsys)
    assert code == 0 and np.load(out).dtype == np.uint8 and np.load(out).shape == (3, 8)
    out = tmp_path / "small.npy"
    run(["encode", "one", "two", "-o", str(out), "--truncate-dim", "16", "--normalize", *model_args], capsys)
    assert np.load(out).shape == (2, 16) and np.allclose(np.linalg.norm(np.load(out), axis=1), 1, atol=1e-5)


def test_stdin_crlf_lines_equal_the_file_lines(model_args, tmp_path, capsys, monkeypatch):
    """A POSIX stdin does not translate \\r\\n: the CLI does, as reading the same bytes from a file does."""
    text = "a\r\nb\r\nc\rd\n"
    code, out, _ = run(["encode", *model_args], capsys, stdin=text, monkeypatch=monkeypatch)
    src = tmp_path / "crlf.txt"
    src.write_bytes(text.encode())
    code2, out2, _ = run(["encode", "-i", str(src), *model_args], capsys)
    rows, rows2 = ([json.loads(line) for line in o.splitlines()] for o in (out, out2))
    assert code == code2 == 0 and [r["text"] for r in rows] == ["a", "b", "c", "d"]
    assert rows == rows2


def test_os_errors_and_interrupts_are_one_line(model_args, tmp_path, capsys, monkeypatch):
    from llm2vec_fast import LLM2Vec

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files of org/name")

    monkeypatch.setattr(LLM2Vec, "from_pretrained", offline)
    code, _, err = run(["encode", "x", "--model", "org/name"], capsys)
    assert code == 2 and err.strip() == ("llm2vec-fast: error: We couldn't connect to 'https://huggingface.co' to load "
                                         "the files of org/name")
    monkeypatch.undo()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM2Vec, "encode_to_disk", interrupted)
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    code, _, err = run(["encode", "-i", str(src), "-o", str(tmp_path / "shards"), *model_args], capsys)
    assert code == 130 and "interrupted; the finished shards in" in err and "the same command resumes" in err
    monkeypatch.setattr(LLM2Vec, "encode", interrupted)
    code, _, err = run(["encode", "x", *model_args], capsys)
    assert code == 130 and err.strip().splitlines()[-1] == "llm2vec-fast: interrupted"


def test_serve_on_a_busy_port_fails_before_loading(capsys, monkeypatch):
    import socket

    from llm2vec_fast import LLM2Vec

    monkeypatch.setattr(LLM2Vec, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run(["serve", "--port", str(port)], capsys)
    assert code == 2 and f"cannot serve on 127.0.0.1:{port}: Address already in use" in err


def test_cli_shard_folder_resumes_from_the_api_and_back(model_args, tiny_encoder_dir, tmp_path, capsys):
    """The CLI passes every option explicitly, the API leaves defaults out: the same settings either way."""
    import torch

    from llm2vec_fast import LLM2Vec

    texts = [f"text number {i}" for i in range(5)]
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "shards"
    assert run(["encode", "-i", str(src), "-o", str(out), "--chunk-size", "2", *model_args], capsys)[0] == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    m = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32)
    m.encode_to_disk(texts, out, chunk_size=2, show_progress_bar=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == stamps  # nothing re-encoded


def test_quantization_ranges_option(model_args, tmp_path, capsys):
    code, _, _ = run(["encode", "-i", str(_lines(tmp_path, 6)), "-o", str(tmp_path / "q"), "--precision", "int8",
                      *model_args], capsys)
    manifest = tmp_path / "q" / "manifest.json"
    assert code == 0 and json.loads(manifest.read_text())["quantization_ranges"]
    code, _, err = run(["encode", "one", "--precision", "int8", *model_args], capsys)
    assert code == 2 and "pass --quantization-ranges FILE" in err
    code, out, _ = run(["encode", "one", "--precision", "int8", "--quantization-ranges", str(manifest),
                        *model_args], capsys)
    assert code == 0 and len(json.loads(out)["embedding"]) == 64
    np.save(tmp_path / "r.npy", np.asarray(json.loads(manifest.read_text())["quantization_ranges"]))
    code, out2, _ = run(["encode", "one", "--precision", "int8", "--quantization-ranges", str(tmp_path / "r.npy"),
                         *model_args], capsys)
    assert code == 0 and out2 == out
    np.save(tmp_path / "bad.npy", np.zeros((3, 64)))
    for argv, message in ((["--quantization-ranges", str(tmp_path / "bad.npy")], "got shape (3, 64)"),
                          (["--quantization-ranges", str(tmp_path / "none.npy")], "does not exist"),
                          (["--quantization-ranges", str(tmp_path / "in.txt")], "cannot read")):
        code, _, err = run(["encode", "one", "--precision", "int8", *argv, *model_args], capsys)
        assert code == 2 and message in err, err
    code, _, err = run(["encode", "one", "--quantization-ranges", str(tmp_path / "r.npy"), *model_args], capsys)
    assert code == 2 and "applies to --precision int8 / uint8" in err


def _lines(tmp_path, n):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i} " + "x " * (i % 3) + "\n" for i in range(n)))
    return src


def test_int8_of_one_text_needs_ranges_before_the_model_loads(capsys):
    code, _, err = run(["encode", "one text", "--model", "no-such-org/no-such-model", "--precision", "int8"], capsys)
    assert code == 2 and "pass --quantization-ranges FILE" in err
