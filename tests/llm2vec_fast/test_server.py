"""The HTTP server: TEI and OpenAI routes give what LLM2Vec.encode gives, errors say what is wrong, concurrent
requests share batches, and the CLI serves."""
import base64
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.server import Batcher, EmbeddingServer, RequestError

PROMPT = "Retrieve passages that answer the question"


@pytest.fixture(scope="module")
def l2v(tiny_encoder_dir):
    model = LLM2Vec.from_pretrained(str(tiny_encoder_dir), device="cpu", dtype=torch.float32, max_length=32)
    model.prompts = {"query": PROMPT}
    return model


@pytest.fixture(scope="module")
def server(l2v):
    with EmbeddingServer(l2v, port=0, max_client_batch_size=4, model_id="tiny").start() as s:
        yield s


def call(server, path, body=None, headers=None, raw=None):
    """(status, parsed JSON or text) of a request; POST when a body is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json",
                                                                        **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, ctype = r.status, r.read().decode(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, text, ctype = e.code, e.read().decode(), e.headers.get("Content-Type", "")
    return status, (json.loads(text) if ctype.startswith("application/json") else text)


def test_embed_equals_encode(server, l2v):
    items = ["A man is playing a flute.", ["Retrieve similar text", "A cat sleeps."], "Hi"]
    status, emb = call(server, "/embed", {"inputs": items})
    expected = l2v.encode(items, normalize_embeddings=True, show_progress_bar=False)
    assert status == 200 and np.allclose(emb, expected.numpy(), atol=1e-5)
    # one string in, one row out; normalize false; an instruction on plain strings; a stored prompt by name
    status, one = call(server, "/embed", {"inputs": "Hi", "normalize": False})
    assert status == 200 and np.allclose(one, l2v.encode(["Hi"], show_progress_bar=False).numpy(), atol=1e-5)
    _, a = call(server, "/embed", {"inputs": ["what is a flute?"], "instruction": PROMPT})
    _, b = call(server, "/embed", {"inputs": ["what is a flute?"], "prompt_name": "query"})
    expected = l2v.encode([[PROMPT, "what is a flute?"]], normalize_embeddings=True, show_progress_bar=False)
    assert np.allclose(a, expected.numpy(), atol=1e-5) and np.allclose(a, b)
    # dimensions: the first N, renormalised
    _, cut = call(server, "/embed", {"inputs": ["Hi"], "dimensions": 16})
    assert len(cut[0]) == 16 and abs(np.linalg.norm(cut[0]) - 1) < 1e-5


def test_openai_route(server, l2v):
    texts = ["first text", "the second one"]
    status, r = call(server, "/v1/embeddings", {"input": texts, "model": "my-name"})
    expected = l2v.encode(texts, normalize_embeddings=True, show_progress_bar=False).numpy()
    assert status == 200 and r["object"] == "list" and r["model"] == "my-name"
    assert [d["index"] for d in r["data"]] == [0, 1]
    assert np.allclose([d["embedding"] for d in r["data"]], expected, atol=1e-5)
    n_tokens = sum(len(x) for x in l2v.tokenizer(texts)["input_ids"])
    assert r["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    _, r64 = call(server, "/v1/embeddings", {"input": "first text", "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(r64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, expected[0], atol=1e-5) and r64["model"] == "tiny"


def test_similarity(server, l2v):
    body = {"inputs": {"source_sentence": "A man plays a flute.", "sentences": ["A flute is played.", "Stocks fell."]}}
    status, scores = call(server, "/similarity", body)
    e = l2v.encode(["A man plays a flute.", "A flute is played.", "Stocks fell."], normalize_embeddings=True,
                   show_progress_bar=False)
    assert status == 200 and np.allclose(scores, (e[1:] @ e[0]).numpy(), atol=1e-5)


def test_embed_all_equals_token_embeddings(server, l2v):
    items = ["A man is playing a flute.", ["Retrieve similar text", "A cat sleeps."]]
    status, per_input = call(server, "/embed_all", {"inputs": items})
    expected = l2v.encode(items, output_value="token_embeddings", show_progress_bar=False)
    assert status == 200 and len(per_input) == 2
    for got, want in zip(per_input, expected, strict=True):
        assert np.allclose(got, want.numpy(), atol=1e-5)
    _, (unit,) = call(server, "/embed_all", {"inputs": "Hi", "normalize": True})
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    # pooled and token requests in flight together are answered from one worker pass each, rows not mixed up
    results = {}

    def ask(key, path, body):
        results[key] = call(server, path, body)

    threads = [threading.Thread(target=ask, args=(i, "/embed_all" if i % 2 else "/embed", {"inputs": [f"text {i}"]}))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        status, r = results[i]
        if i % 2:
            want = l2v.encode([f"text {i}"], output_value="token_embeddings", show_progress_bar=False)[0]
        else:
            want = l2v.encode([f"text {i}"], normalize_embeddings=True, show_progress_bar=False)
        assert status == 200 and np.allclose(r[0] if i % 2 else r, want.numpy(), atol=1e-5), i
    status, r = call(server, "/embed_all", {"inputs": "x", "dimensions": 8})
    assert status == 422 and "unknown field" in r["error"]


def test_tokenize(server, l2v):
    status, (plain, instructed) = call(server, "/tokenize", {"inputs": ["A flute.", ["Find it", "A flute."]]})
    ids = l2v.tokenizer(["A flute."])["input_ids"][0]
    assert status == 200 and [t["id"] for t in plain] == ids
    texts = [t for t in plain if not t["special"]]
    assert "".join(t["text"] for t in texts) == "A flute."  # the input's own characters, not the vocab's
    assert all("A flute."[t["start"]:t["stop"]] == t["text"] for t in texts)
    has_special = bool(set(ids) & set(l2v.tokenizer.all_special_ids))
    assert any(t["special"] and t["start"] is None for t in plain) == has_special
    # the instruction's tokens come first and have no offsets into the text; the text's tokens span "A flute."
    # (the first one may take the space before the text with it: its span is clipped to the text)
    assert len(instructed) > len(plain) and instructed[1]["start"] is None
    spans = [(t["start"], t["stop"]) for t in instructed if t["start"] is not None]
    assert "".join("A flute."[a:b] for a, b in spans) == "A flute." and spans[0][0] == 0
    _, (bare,) = call(server, "/tokenize", {"inputs": "A flute.", "add_special_tokens": False})
    assert [t["id"] for t in bare] == l2v.tokenizer(["A flute."], add_special_tokens=False)["input_ids"][0]
    assert call(server, "/tokenize", {"inputs": "x", "add_special_tokens": 1})[0] == 422


ERRORS = [
    pytest.param({"inputs": []}, 422, "cannot be empty", id="empty"),
    pytest.param({"inputs": ["a"] * 5}, 413, "batch size 5 > maximum allowed batch size 4", id="too-many"),
    pytest.param({"inputs": ["ok", 3]}, 422, r"inputs\[1\] must be a string", id="bad-item"),
    pytest.param({"inputs": ["ok", ["a", "b", "c"]]}, 422, r"inputs\[1\]", id="bad-pair"),
    pytest.param({"inputs": "x", "nomalize": True}, 422, "unknown field", id="typo-field"),
    pytest.param({"inputs": "x", "normalize": "yes"}, 422, "normalize must be true or false", id="bad-bool"),
    pytest.param({"inputs": "x", "prompt_name": "nope"}, 422, "unknown prompt_name 'nope'", id="bad-prompt"),
    pytest.param({"inputs": "x", "dimensions": 65}, 422, r"dimensions must be an integer in 1\.\.64", id="dims"),
    pytest.param({"inputs": " ".join(["word"] * 60)}, 413, "more than the model's max_length 32", id="too-long"),
    pytest.param([1, 2], 422, "must be a JSON object", id="not-object"),
    pytest.param({"inputs": "a", "truncation_direction": 5}, 422, "only truncation_direction 'right'.*got 5",
                 id="direction-not-a-string"),
    pytest.param({"inputs": "a", "prompt_name": ["x"]}, 422, r'prompt_name must be a string, got \["x"\]',
                 id="prompt-name-not-a-string"),
    pytest.param({"inputs": ["a", "   "]}, 422, r"inputs\[1\] cannot be empty", id="blank-text"),
    pytest.param({"inputs": [["Represent it", ""]]}, 422, r"inputs\[0\] cannot be empty", id="blank-pair-text"),
]


@pytest.mark.parametrize("body, status, message", ERRORS)
def test_errors_name_the_problem(server, body, status, message):
    got, r = call(server, "/embed", body)
    assert got == status and r["error_type"] and re.search(message, r["error"]), r


def test_an_unexpected_failure_is_answered_500(server, monkeypatch):
    def broken(items, tokens=False):
        raise RuntimeError("device lost")

    monkeypatch.setattr(server.batcher, "submit", broken)
    got, r = call(server, "/embed", {"inputs": "a"})
    assert got == 500 and r["error"] == "internal error: RuntimeError: device lost" and r["error_type"] == "Backend"


def test_other_errors(server):
    status, r = call(server, "/v1/embeddings", {"input": ["ok", ""]})
    assert status == 422 and "input[1] cannot be empty" in r["error"]
    long = " ".join(["word"] * 60)
    assert call(server, "/embed", {"inputs": long, "truncate": True})[0] == 200
    status, r = call(server, "/embed", raw=b"{not json")
    assert status == 422 and "not valid JSON" in r["error"]
    status, r = call(server, "/nowhere", {"inputs": "x"})
    assert status == 404 and "/embed" in r["error"]
    status, r = call(server, "/v1/embeddings", {"input": "x", "encoding_format": "int8"})
    assert status == 422 and "encoding_format" in r["error"]
    status, r = call(server, "/embed", raw=b" " * 2_000_001)
    assert status == 413 and "payload limit" in r["error"]
    # each route's refusal of an over-long text says what that route's client can do
    long_text = " ".join(["word"] * 60)
    status, r = call(server, "/embed", {"inputs": long_text})
    assert status == 413 and "send truncate: true" in r["error"]
    status, r = call(server, "/v1/embeddings", {"input": long_text})
    assert status == 413 and "--auto-truncate" in r["error"] and "send truncate" not in r["error"]


def _raw_http(server, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send hand-written request bytes; (status, JSON body) of the answer, which must come within 10 s."""
    import http.client
    import socket

    host, port = server.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


@pytest.mark.parametrize("header,status,message", [
    (b"Content-Length: abc", 400, "Content-Length must be a non-negative integer, got 'abc'"),
    (b"Content-Length: -1", 400, "got '-1'"),
    (b"Transfer-Encoding: chunked", 411, "chunked request bodies are not supported"),
])
def test_malformed_request_framing_gets_an_answer(server, header, status, message):
    head = b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header + b"\r\n"
    got, r = _raw_http(server, head, b'5\r\n{"a":\r\n0\r\n\r\n' if b"chunked" in header else b"")
    assert got == status and message in r["error"], r
    assert call(server, "/health")[0] == 200  # the server still answers


def test_health_info_metrics(server):
    assert call(server, "/health") == (200, {"status": "ok"})
    _, info = call(server, "/info")
    assert info["model_id"] == "tiny" and info["dimensions"] == 64 and info["max_input_length"] == 32
    assert info["bidirectional"] is True and info["prompts"] == {"query": PROMPT}
    call(server, "/embed", {"inputs": ["counted"]})
    status, text = call(server, "/metrics")
    assert status == 200 and 'llm2vec_fast_requests_total{route="/embed",status="200"}' in text
    assert "llm2vec_fast_texts_total" in text


def test_api_key(l2v):
    with EmbeddingServer(l2v, port=0, api_key="s3cret").start() as s:
        status, r = call(s, "/embed", {"inputs": "x"})
        assert status == 401 and r["error_type"] == "Unauthorized"
        status, _ = call(s, "/embed", {"inputs": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert status == 200


class _SlowEncoder:
    """Stands in for LLM2Vec: row i of a call is [call number, position]; the first call is slow."""

    def __init__(self):
        self.calls, self.release = [], threading.Event()

    def encode(self, items, **kw):
        self.calls.append(list(items))
        if len(self.calls) == 1:
            self.release.wait(10)
        if any(it == "boom" for it in items):
            raise RuntimeError("model exploded")
        return torch.tensor([[float(len(self.calls)), float(i)] for i in range(len(items))])


def test_concurrent_requests_share_one_batch_and_get_their_own_rows():
    enc = _SlowEncoder()
    batcher = Batcher(enc, max_batch_texts=100)
    results = {}

    def client(name, items):
        try:
            results[name] = batcher.submit(items)
        except RequestError as e:
            results[name] = e

    first = threading.Thread(target=client, args=("first", ["a"]))
    first.start()
    while not enc.calls:  # the worker is busy with the first request
        time.sleep(0.01)
    others = [threading.Thread(target=client, args=(f"c{i}", [f"t{i}"] * (i + 1))) for i in range(5)]
    for t in others:
        t.start()
    while batcher.queue_size() < 5:
        time.sleep(0.01)
    enc.release.set()
    for t in [first, *others]:
        t.join(10)
    assert len(enc.calls) == 2 and len(enc.calls[1]) == 15  # the five waiting requests went in one call
    for i in range(5):
        rows = results[f"c{i}"]
        assert rows.shape == (i + 1, 2) and (rows[:, 0] == 2).all()
        assert sorted(enc.calls[1][int(p)] for p in rows[:, 1]) == [f"t{i}"] * (i + 1)  # its own rows
    # a failing batch reports to its clients; the worker lives on
    with pytest.raises(RequestError, match="model exploded"):
        batcher.submit(["boom"])
    assert batcher.submit(["fine"]).shape == (1, 2)
    batcher.close()


def test_overloaded_queue_answers_429():
    enc = _SlowEncoder()
    batcher = Batcher(enc, max_queue=1)
    threading.Thread(target=batcher.submit, args=(["a"],), daemon=True).start()
    while not enc.calls:
        time.sleep(0.01)
    threading.Thread(target=batcher.submit, args=(["b"],), daemon=True).start()  # fills the queue
    while batcher.queue_size() < 1:
        time.sleep(0.01)
    with pytest.raises(RequestError, match="overloaded") as e:
        batcher.submit(["c"])
    assert e.value.status == 429
    enc.release.set()
    batcher.close()


def test_bad_server_settings(l2v):
    with pytest.raises(ValueError, match="max_client_batch_size must be >= 1, got 0"):
        EmbeddingServer(l2v, port=0, max_client_batch_size=0)


def test_cli_serves(tiny_encoder_dir):
    proc = subprocess.Popen([sys.executable, "-m", "llm2vec_fast.cli", "serve", "--model", str(tiny_encoder_dir),
                             "--device", "cpu", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if " on http://" in line:
                url = line.rsplit(" on ", 1)[1].strip()
        assert url, "the server did not report its address"
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        req = urllib.request.Request(url + "/embed", data=json.dumps({"inputs": ["hello"]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert len(json.loads(r.read())[0]) == 64
        proc.terminate()  # SIGTERM: a clean stop
        assert proc.wait(60) == 0 and "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_bench_server_script(tiny_encoder_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.bench_server import main as bench

    assert bench(["--model", str(tiny_encoder_dir), "--clients", "3", "--requests", "2", "--out", str(tmp_path),
                  "--name", "srv"]) == 0
    rows = json.loads((tmp_path / "srv.json").read_text())["rows"]
    by = {r["mode"]: r for r in rows}
    assert set(by) == {"per-request", "merged", "offline"} and len({r["texts"] for r in rows}) == 1
    assert by["per-request"]["encode_calls"] == 6 and 1 <= by["merged"]["encode_calls"] <= 6
    assert (tmp_path / "srv.md").read_text().count("|") > 10


def test_a_burst_of_clients_is_served(server):
    """32 connections at once: none is reset (the listen backlog holds them), every one gets its rows."""
    results, start = [], threading.Barrier(32)

    def client(i):
        start.wait()
        results.append(call(server, "/embed", {"inputs": [f"client {i}"]})[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 32


def test_a_burst_past_the_request_limit_is_answered_not_reset(l2v):
    """40 connections at once on a server that takes 2 requests and 4 connections: each gets an HTTP answer (200, 429
    past the requests, 503 past the connections), none a reset: the listen backlog is not the request limit."""
    with EmbeddingServer(l2v, port=0, max_concurrent_requests=2, max_wait_ms=200).start() as s:
        results, start = [], threading.Barrier(40)

        def client(i):
            start.wait()
            try:
                results.append(call(s, "/embed", {"inputs": [f"client {i}"]})[0])
            except OSError as e:  # a reset connection
                results.append(type(e).__name__)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(results) == 40 and set(results) <= {200, 429, 503} and 200 in results, results


def test_a_body_shorter_than_its_content_length_is_refused(server):
    import http.client
    import socket

    host, port = server.url.split("//")[1].split(":")
    body = b'{"inputs": ["hi"]}'
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100"
                     b"\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)  # the client is done: 18 of the 100 bytes announced
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        status, answer = resp.status, json.loads(resp.read())
    assert status == 400 and f"incomplete request body: {len(body)} of the 100 bytes" in answer["error"]


# ---------------------------------------------------------------- production review: isolation, limits, shutdown
def test_a_bad_request_fails_alone(l2v, monkeypatch):
    """A lone surrogate is refused up front (422); a request whose encode fails for another reason fails alone
    (500), and the requests batched with it are answered; /metrics counts what failed apart."""
    with EmbeddingServer(l2v, port=0, max_wait_ms=300, model_id="tiny").start() as s:
        status, body = call(s, "/embed", raw=b'{"inputs": "bad \\ud800 text"}')
        assert status == 422 and "inputs[0] is not valid Unicode text: a lone surrogate" in body["error"]
        status, body = call(s, "/embed", raw=b'{"inputs": ["ok"], "instruction": "\\ud800"}')
        assert status == 422 and "instruction is not valid Unicode text" in body["error"]
        real = type(l2v).encode

        def flaky(self, sentences, *a, **kw):
            if any("POISON" in (x if isinstance(x, str) else x[1]) for x in sentences):
                raise RuntimeError("poisoned batch")
            return real(self, sentences, *a, **kw)

        monkeypatch.setattr(type(l2v), "encode", flaky)
        results = {}

        def send(name, text):
            results[name] = call(s, "/embed", {"inputs": [text]})

        threads = [threading.Thread(target=send, args=(f"ok{i}", f"a fine text {i}")) for i in range(4)]
        threads.append(threading.Thread(target=send, args=("bad", "POISON text")))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results["bad"][0] == 500 and "poisoned batch" in results["bad"][1]["error"]
        assert all(results[f"ok{i}"][0] == 200 for i in range(4))
        _, metrics = call(s, "/metrics")
        assert "llm2vec_fast_failed_requests_total 1" in metrics
        assert re.search(r"llm2vec_fast_texts_total 4\n", metrics)


def test_deep_json_and_empty_source_sentence_are_422(server):
    status, body = call(server, "/embed", raw=b"[" * 100000 + b"]" * 100000)
    assert status == 422 and "nests JSON too deeply" in body["error"]
    status, body = call(server, "/similarity", {"inputs": {"source_sentence": "  ", "sentences": ["a", "b"]}})
    assert status == 422 and "inputs.source_sentence cannot be empty" in body["error"]


def test_stalled_clients_time_out_and_connections_are_capped(l2v):
    import socket

    with EmbeddingServer(l2v, port=0, read_timeout=0.5, max_connections=2).start() as s:
        host, port = s.httpd.server_address[:2]
        stalled = socket.create_connection((host, port))
        stalled.sendall(b"POST /embed HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"in")
        idle = socket.create_connection((host, port))
        time.sleep(0.2)
        time.sleep(0.2)
        # two connections open: a third is answered 503, also when it sends its request first (urllib)
        status, body = call(s, "/embed", {"inputs": ["x"]})
        assert status == 503 and "too many open connections" in body["error"]
        stalled.settimeout(5)
        assert stalled.recv(4096) == b""  # dropped after read_timeout, its thread freed
        idle.settimeout(5)
        assert idle.recv(4096) == b""
        time.sleep(0.2)
        assert call(s, "/health")[0] == 200  # slots free again
        stalled.close()
        idle.close()


def test_close_answers_requests_in_flight(l2v, monkeypatch):
    real = type(l2v).encode
    started = threading.Event()

    def slow(self, *a, **kw):
        started.set()
        time.sleep(1.0)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(l2v), "encode", slow)
    s = EmbeddingServer(l2v, port=0).start()
    results = []
    t = threading.Thread(target=lambda: results.append(call(s, "/embed", {"inputs": ["in flight"]})))
    t.start()
    assert started.wait(10)
    s.close()  # while the request is being encoded
    t.join(10)
    assert results and results[0][0] == 200 and len(results[0][1][0]) == l2v.model.config.hidden_size
