"""An HTTP embedding server: the routes of Text Embeddings Inference (TEI) and of OpenAI's embeddings API over one
``LLM2Vec`` model, with the texts of concurrent requests merged into shared packed batches.

    llm2vec-fast serve --model out/sup --port 8080
    curl localhost:8080/embed -H 'Content-Type: application/json' -d '{"inputs": ["a text", "another"]}'

Routes (JSON in, JSON out):

* ``POST /embed`` (TEI): ``{"inputs": str | [str | [instruction, text]], "normalize": true, "truncate": null,
  "prompt_name": null, "instruction": null, "dimensions": null}`` → ``[[float, ...], ...]``.
  ``instruction`` (or a stored ``prompt_name``) goes to every plain-string input; it is attended to, not pooled.
* ``POST /v1/embeddings`` (OpenAI): ``{"input": str | [str], "model": ..., "encoding_format": "float" | "base64",
  "dimensions": int}`` → ``{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}],
  "model": ..., "usage": {"prompt_tokens": n, "total_tokens": n}}``; base64 is little-endian float32, as OpenAI's.
* ``POST /similarity`` (TEI): ``{"inputs": {"source_sentence": str, "sentences": [str]}}`` → cosine per sentence.
* ``POST /embed_all`` (TEI): ``/embed``'s fields but ``dimensions``, ``normalize`` false by default → one list of
  token vectors per input (the pooled tokens' last hidden states, as ``encode(output_value="token_embeddings")``).
* ``POST /tokenize`` (TEI): ``{"inputs": ..., "add_special_tokens": true, "prompt_name"/"instruction"}`` → per input
  the tokens the model sees, ``{"id", "text", "special", "start", "stop"}`` (offsets into the input as sent).
* ``GET /health``, ``GET /info``, ``GET /metrics`` (Prometheus text).

Errors are ``{"error": message, "error_type": ...}`` with TEI's status codes: 413 for too many inputs, a body over the
payload limit or (``truncate`` false) a text longer than ``max_length`` tokens; 422 for a malformed request; 429 when
the queue is full; 401 without the API key when one is set; 500 when the model fails.

Batching: one worker thread owns the model. Whenever it is free it takes every request waiting (up to
``max_batch_texts`` texts) and encodes them in one ``LLM2Vec.encode`` call, so under load clients share packed,
length-sorted batches; a lone request is not held back unless ``max_wait_ms`` asks for it.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch.nn.functional as F

logger = logging.getLogger(__name__)

class RequestError(Exception):
    """A client mistake or refusal, answered with ``status`` and a JSON error body."""

    def __init__(self, status: int, message: str, error_type: str = "Validation"):
        super().__init__(message)
        self.status, self.error_type = status, error_type


class _Job:
    __slots__ = ("items", "tokens", "done", "result", "error")

    def __init__(self, items, tokens=False):
        self.items, self.tokens, self.done, self.result, self.error = items, tokens, threading.Event(), None, None


class Batcher:
    """Merges the texts of waiting requests into one ``encode`` call on a worker thread (the only model user)."""

    def __init__(self, l2v, max_batch_texts=4096, max_wait_ms=0.0, max_batch_tokens=None, max_queue=512):
        self.l2v, self.max_batch_texts, self.max_wait = l2v, int(max_batch_texts), float(max_wait_ms) / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self.stats = {"batches": 0, "texts": 0, "encode_seconds": 0.0, "largest_batch": 0, "failed_requests": 0}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llm2vec-fast-batcher", daemon=True)
        self._thread.start()

    def queue_size(self) -> int:
        return self._queue.qsize()

    def submit(self, items, tokens=False):
        """Embeddings (float32, CPU, ``[len(items), H]``) of strings / ``[instruction, text]`` pairs, or with
        ``tokens`` a list of their token embeddings (``[L_i, H]`` each); blocks."""
        job = _Job(items, tokens)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(429, f"the server is overloaded: {self._queue.maxsize} requests are already waiting",
                               "Overloaded") from None
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self):
        """Finish every queued request (answered), then stop the worker."""
        self._queue.put(None)
        self._thread.join()

    def _take(self):
        """The next batch of jobs: the first waiting one, then whatever else waits (within max_wait)."""
        first = self._queue.get()
        if first is None:
            return None
        jobs, n = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch_texts:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: finish this batch first
                self._queue.put(None)
                break
            jobs.append(job)
            n += len(job.items)
        return jobs

    def _run(self):
        while True:
            jobs = self._take()
            if jobs is None:
                return
            t = time.perf_counter()
            # one encode call per kind of output: pooled embeddings, or token embeddings (/embed_all)
            for tokens in (False, True):
                group = [j for j in jobs if j.tokens == tokens]
                if group:
                    self._encode_group(group, tokens)
            ok = [j for j in jobs if j.error is None]
            with self._lock:
                self.stats["batches"] += 1
                self.stats["texts"] += sum(len(j.items) for j in ok)
                self.stats["failed_requests"] += len(jobs) - len(ok)
                self.stats["encode_seconds"] += time.perf_counter() - t
                self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(len(j.items) for j in jobs))
            for j in jobs:
                j.done.set()

    def _encode_group(self, group, tokens):
        """Encode the jobs of ``group`` in one call; if that fails, each on its own, so that one bad request fails
        alone instead of taking the batch's other requests with it."""
        def encode(items):
            return self.l2v.encode(items, show_progress_bar=False, convert_to_tensor=True,
                                   max_batch_tokens=self.max_batch_tokens,
                                   output_value="token_embeddings" if tokens else "sentence_embedding")

        try:
            emb = encode([it for j in group for it in j.items])
        except Exception as e:  # every waiting client learns why; the worker lives on
            if len(group) == 1:
                group[0].error = RequestError(500, f"encoding failed: {type(e).__name__}: {e}", "Backend")
                return
            for j in group:
                self._encode_group([j], tokens)
            return
        at = 0
        for j in group:
            j.result = emb[at:at + len(j.items)]
            at += len(j.items)


class EmbeddingServer:
    """TEI- and OpenAI-compatible HTTP server over one :class:`~llm2vec_fast.LLM2Vec`.

    Args:
        l2v: the loaded encoder.
        host, port: where to listen (port 0 picks a free one; see :attr:`url`).
        model_id: the name ``/info`` and OpenAI responses report (default: the model's ``_name_or_path``).
        max_client_batch_size: most inputs per request (TEI's default 32); more is a 413.
        max_batch_texts: most texts the worker merges into one ``encode`` call.
        max_batch_tokens: token budget per packed batch inside that call (default: the device's).
        max_wait_ms: how long the worker waits for more requests before encoding (0: never waits).
        max_concurrent_requests: requests that may wait at once; more get 429.
        payload_limit: largest request body in bytes (TEI's default 2 MB); more is a 413.
        auto_truncate: what ``truncate`` means when a request does not say: True cuts texts at ``max_length`` tokens
            (LLM2Vec's own behaviour), False (TEI's default) refuses them with a 413 naming the input.
        api_key: when set, every request needs ``Authorization: Bearer <api_key>``.
        read_timeout: seconds a connection may wait for a client's next bytes (a stalled or idle client is dropped
            then, freeing its thread).
        max_connections: open connections at once (default twice ``max_concurrent_requests``); more are answered
            503 and closed.

    Stopping (:meth:`close`, SIGTERM or Ctrl-C under ``llm2vec-fast serve``) stops accepting, answers every request
    already received, then ends the worker.
    """

    def __init__(self, l2v, host="127.0.0.1", port=8080, model_id=None, max_client_batch_size=32,
                 max_batch_texts=4096, max_batch_tokens=None, max_wait_ms=0.0, max_concurrent_requests=512,
                 payload_limit=2_000_000, auto_truncate=False, api_key=None, log_requests=False, read_timeout=60.0,
                 max_connections=None):
        max_connections = 2 * int(max_concurrent_requests) if max_connections is None else max_connections
        for name, value in (("max_client_batch_size", max_client_batch_size), ("max_batch_texts", max_batch_texts),
                            ("max_concurrent_requests", max_concurrent_requests), ("payload_limit", payload_limit),
                            ("max_connections", max_connections)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if float(max_wait_ms) < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if not float(read_timeout) > 0:
            raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
        self.read_timeout = float(read_timeout)
        self.l2v = l2v
        self.model_id = model_id or getattr(l2v.model.config, "_name_or_path", "") or "llm2vec-fast"
        self.max_client_batch_size, self.payload_limit = int(max_client_batch_size), int(payload_limit)
        self.auto_truncate, self.api_key, self.log_requests = bool(auto_truncate), api_key, log_requests
        self.batcher = Batcher(l2v, max_batch_texts, max_wait_ms, max_batch_tokens, max_concurrent_requests)
        # request threads count tokens with their own tokenizer copy, one at a time: a fast tokenizer is not safe to
        # call from two threads when their truncation settings differ (and the worker's encode truncates)
        self._count_tokenizer, self._count_lock = copy.deepcopy(l2v.tokenizer), threading.Lock()
        self.requests = {}  # (route, status) -> count
        self._lock = threading.Lock()
        # the listen backlog holds every connection that may be open at once, and at least 128 (the default of 5
        # resets bursts of clients instead of answering them; the kernel caps it at net.core.somaxconn)
        self.httpd = _HTTPServer((host, int(port)), _handler_class(self), int(max_connections),
                                 max(int(max_connections), 128), lambda status: self._count("other", status))
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        """Serve on a background thread; returns self (``with EmbeddingServer(...).start() as s:``)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="llm2vec-fast-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self):
        """Stop accepting, answer every request already received, end the worker."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.end_idle_connections()
        self.httpd.server_close()  # joins the connection threads: each answers what it read, then ends
        self.batcher.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ routes
    def info(self) -> dict:
        l2v = self.l2v
        cfg = l2v.model.config
        from llm2vec_fast import __version__
        from llm2vec_fast.bidirectional import is_bidirectional
        from llm2vec_fast.encoder import _base

        return {"model_id": self.model_id, "model_type": getattr(cfg, "model_type", None),
                "dimensions": int(getattr(cfg, "hidden_size", 0)), "max_input_length": l2v.max_length,
                "pooling": l2v.pooling_mode, "bidirectional": is_bidirectional(_base(l2v.model)),
                "dtype": str(next(l2v.model.parameters()).dtype).replace("torch.", ""), "device": str(l2v.device),
                "max_client_batch_size": self.max_client_batch_size, "auto_truncate": self.auto_truncate,
                "prompts": dict(l2v.prompts), "version": __version__, "backend": "llm2vec_fast"}

    def embed(self, body) -> list:
        """TEI ``/embed``."""
        _only_keys(body, {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "instruction",
                          "dimensions"})
        _right_truncation(body)
        items = self._items(body.get("inputs"), "inputs", pairs=True)
        items = self._instruct(items, body.get("instruction"), body.get("prompt_name"))
        emb, _ = self._encode(items, body.get("truncate"))
        emb = _postprocess(emb, _bool(body, "normalize", True), body.get("dimensions"))
        return emb.tolist()

    def embed_all(self, body) -> list:
        """TEI ``/embed_all``: the last hidden state of every pooled token of each input (the text's tokens; the
        instruction's too when the encoder pools them), one ``[L_i][H]`` list per input."""
        _only_keys(body, {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name", "instruction"})
        _right_truncation(body)
        items = self._items(body.get("inputs"), "inputs", pairs=True)
        items = self._instruct(items, body.get("instruction"), body.get("prompt_name"))
        normalize = _bool(body, "normalize", False)
        per_input, _ = self._encode(items, body.get("truncate"), tokens=True)
        return [(F.normalize(t, dim=-1) if normalize else t).tolist() for t in per_input]

    def tokenize(self, body) -> list:
        """TEI ``/tokenize``: the tokens the model sees for each input (after the encoder's own wrapping), each
        ``{"id", "text", "special", "start", "stop"}`` with character offsets into the input's text as sent (clipped
        to it; None for special tokens and for tokens wholly inside an instruction or template)."""
        _only_keys(body, {"inputs", "add_special_tokens", "prompt_name", "instruction"})
        from llm2vec_fast.encoder import _normalize_inputs

        items = self._items(body.get("inputs"), "inputs", pairs=True)
        items = self._instruct(items, body.get("instruction"), body.get("prompt_name"))
        special = _bool(body, "add_special_tokens", True)
        joints, cuts, texts = self.l2v._joint_strings(_normalize_inputs(items))
        with self._count_lock:
            enc = self._count_tokenizer(joints, add_special_tokens=special, truncation=True,
                                        max_length=self.l2v.max_length, return_offsets_mapping=True,
                                        return_special_tokens_mask=True)
            names = [self._count_tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
        out = []
        for i, joint in enumerate(joints):
            # offsets into the text the client sent: the joint string holds it from `cut` on (after any instruction)
            cut = cuts[i] or 0
            text_end = cut + len(texts[i]) if cuts[i] is not None else 0
            rows = []
            for tid, name, (a, b), sp in zip(enc["input_ids"][i], names[i], enc["offset_mapping"][i],
                                             enc["special_tokens_mask"][i], strict=True):
                # a token that overlaps the text (" A" can take the space before it) gets its span clipped to it
                inside = not sp and a < text_end and b > cut
                rows.append({"id": int(tid), "text": name if sp else joint[a:b], "special": bool(sp),
                             "start": max(a, cut) - cut if inside else None,
                             "stop": min(b, text_end) - cut if inside else None})
            out.append(rows)
        return out

    def openai_embeddings(self, body) -> dict:
        """OpenAI ``/v1/embeddings``."""
        _only_keys(body, {"input", "model", "encoding_format", "dimensions", "user"})
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(422, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
        items = self._items(body.get("input"), "input", pairs=False)
        emb, tokens = self._encode(items, None, count=True, hint="OpenAI's request has no truncate field: the server "
                                   "cuts long inputs when started with --auto-truncate")
        # OpenAI's embeddings are unit length; a dimensions cut is renormalised
        emb = _postprocess(emb, True, body.get("dimensions"))
        data = []
        for i, row in enumerate(emb.numpy()):
            vec = base64.b64encode(row.astype("<f4").tobytes()).decode() if fmt == "base64" else row.tolist()
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return {"object": "list", "data": data, "model": body.get("model") or self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def similarity(self, body) -> list:
        """TEI ``/similarity``: cosine of ``source_sentence`` with each of ``sentences``."""
        _only_keys(body, {"inputs", "truncate", "prompt_name", "instruction"})
        inputs = body.get("inputs")
        if not isinstance(inputs, dict) or not isinstance(inputs.get("source_sentence"), str):
            raise RequestError(422, "inputs must be {\"source_sentence\": str, \"sentences\": [str, ...]}")
        if not inputs["source_sentence"].strip():
            raise RequestError(422, "inputs.source_sentence cannot be empty: it has no text to embed")
        _check_unicode(inputs["source_sentence"], "inputs.source_sentence")
        sentences = self._items(inputs.get("sentences"), "inputs.sentences", pairs=False)
        items = self._instruct([inputs["source_sentence"], *sentences], body.get("instruction"),
                               body.get("prompt_name"))
        emb, _ = self._encode(items, body.get("truncate"))
        emb = F.normalize(emb, dim=-1)
        return (emb[1:] @ emb[0]).tolist()

    def metrics(self) -> str:
        s = dict(self.batcher.stats)
        lines = ["# TYPE llm2vec_fast_requests_total counter"]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'llm2vec_fast_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += ["# TYPE llm2vec_fast_texts_total counter", f"llm2vec_fast_texts_total {s['texts']}",
                  "# TYPE llm2vec_fast_batches_total counter", f"llm2vec_fast_batches_total {s['batches']}",
                  "# TYPE llm2vec_fast_encode_seconds_total counter",
                  f"llm2vec_fast_encode_seconds_total {s['encode_seconds']:.6f}",
                  "# TYPE llm2vec_fast_failed_requests_total counter",
                  f"llm2vec_fast_failed_requests_total {s['failed_requests']}",
                  "# TYPE llm2vec_fast_largest_batch_texts gauge",
                  f"llm2vec_fast_largest_batch_texts {s['largest_batch']}",
                  "# TYPE llm2vec_fast_queue_size gauge", f"llm2vec_fast_queue_size {self.batcher.queue_size()}"]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ helpers
    def _items(self, inputs, name, pairs):
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list):
            raise RequestError(422, f"{name} must be a string or a list of strings"
                               + (" / [instruction, text] pairs" if pairs else "")
                               + f", got {type(inputs).__name__}")
        if not inputs:
            raise RequestError(422, f"{name} cannot be empty")
        if len(inputs) > self.max_client_batch_size:
            raise RequestError(413, f"batch size {len(inputs)} > maximum allowed batch size "
                               f"{self.max_client_batch_size} (max_client_batch_size)")
        for i, it in enumerate(inputs):
            ok = isinstance(it, str) or (pairs and isinstance(it, list) and len(it) == 2
                                         and all(isinstance(x, str) for x in it))
            if not ok:
                want = "a string or an [instruction, text] pair" if pairs else "a string"
                raise RequestError(422, f"{name}[{i}] must be {want}, got {json.dumps(it)[:80]}")
            if not (it if isinstance(it, str) else it[1]).strip():
                # nothing to embed (encode would give a zero vector, not unit length): refused, as TEI and OpenAI do
                raise RequestError(422, f"{name}[{i}] cannot be empty: it has no text to embed")
            for text in ([it] if isinstance(it, str) else it):
                _check_unicode(text, f"{name}[{i}]")
        return inputs

    def _instruct(self, items, instruction, prompt_name):
        if instruction is not None and prompt_name is not None:
            raise RequestError(422, "give prompt_name or instruction, not both")
        if prompt_name is not None and not isinstance(prompt_name, str):
            raise RequestError(422, f"prompt_name must be a string, got {json.dumps(prompt_name)[:80]}")
        if prompt_name is not None:
            if prompt_name not in self.l2v.prompts:
                raise RequestError(422, f"unknown prompt_name {prompt_name!r}; stored prompts: "
                                   f"{sorted(self.l2v.prompts)}")
            instruction = self.l2v.prompts[prompt_name]
        if instruction is None or instruction == "":
            return items
        if not isinstance(instruction, str):
            raise RequestError(422, f"instruction must be a string, got {type(instruction).__name__}")
        _check_unicode(instruction, "instruction")
        return [[instruction, it] if isinstance(it, str) else it for it in items]

    def _encode(self, items, truncate, count=False, tokens=False, hint="send truncate: true to cut it at the end"):
        """(embeddings [N, H] float32 CPU, or with ``tokens`` a list of [L_i, H]; total tokens or None). Refuses
        over-long texts unless truncating; tokens are counted here (a second tokenization besides the encoder's)
        only for that check or when ``count``."""
        from llm2vec_fast.encoder import _normalize_inputs

        if truncate is None:
            truncate = self.auto_truncate
        elif not isinstance(truncate, bool):
            raise RequestError(422, f"truncate must be true or false, got {json.dumps(truncate)}")
        if truncate and not count:
            return self.batcher.submit(items, tokens), None
        joints, _, _ = self.l2v._joint_strings(_normalize_inputs(items))
        with self._count_lock:
            lengths = [len(x) for x in self._count_tokenizer(joints, add_special_tokens=True)["input_ids"]]
        limit = self.l2v.max_length
        if not truncate:
            over = [(i, n) for i, n in enumerate(lengths) if n > limit]
            if over:
                i, n = over[0]
                raise RequestError(413, f"input {i} has {n} tokens, more than the model's max_length {limit}; "
                                   + hint)
        return self.batcher.submit(items, tokens), sum(min(n, limit) for n in lengths)

    def _count(self, route, status):
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1


def _check_unicode(text, where):
    # JSON may carry a lone surrogate ("\ud800"), which no tokenizer takes: refused here, not in the shared batch
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(422, f"{where} is not valid Unicode text: a lone surrogate {text[e.start]!r} at "
                           f"character {e.start}") from None


def _only_keys(body, allowed):
    if not isinstance(body, dict):
        raise RequestError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; expected some of {sorted(allowed)}")


def _right_truncation(body):
    direction = body.get("truncation_direction", "right")
    if not isinstance(direction, str) or direction.lower() != "right":
        raise RequestError(422, f"only truncation_direction 'right' is supported (texts are cut at the end), got "
                           f"{json.dumps(direction)[:80]}")


def _bool(body, key, default):
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise RequestError(422, f"{key} must be true or false, got {json.dumps(v)}")
    return v


def _postprocess(emb, normalize, dimensions):
    from llm2vec_fast.quantization import truncate_embeddings

    if dimensions is None:
        return F.normalize(emb, dim=-1) if normalize else emb
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= emb.shape[-1]:
        raise RequestError(422, f"dimensions must be an integer in 1..{emb.shape[-1]}, got {json.dumps(dimensions)}")
    return truncate_embeddings(emb, dimensions, renormalize=normalize)


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, at most ``max_connections`` of them (more are answered 503 and closed), joined when
    the server closes (their requests are answered, not cut off)."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address, handler, max_connections, backlog, count):
        self.request_queue_size = backlog
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open, self._open_lock, self._count = set(), threading.Lock(), count
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self._count(503)
            # answered on a short-lived thread of its own: reading the request first (a client still sending would
            # get a reset instead of the answer) must not hold up the accept loop
            threading.Thread(target=self._reject, args=(request,), daemon=True).start()
            return
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def _reject(self, request):
        body = json.dumps({"error": "too many open connections; retry later", "error_type": "Overloaded"})
        try:
            request.settimeout(1.0)
            try:
                request.recv(1 << 16)  # the request (or its start): read before answering
            except OSError:
                pass
            request.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode())
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self._slots.release()

    def end_idle_connections(self):
        """Stop reading from every open connection: one waiting for its next request ends at once; one whose request
        was read still writes its answer."""
        import socket

        with self._open_lock:
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


def _handler_class(server: EmbeddingServer):
    routes_post = {"/embed": server.embed, "/embed_all": server.embed_all, "/tokenize": server.tokenize,
                   "/v1/embeddings": server.openai_embeddings, "/embeddings": server.openai_embeddings,
                   "/similarity": server.similarity}
    routes_get = ("/health", "/info", "/metrics")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "llm2vec-fast"
        timeout = server.read_timeout  # a stalled or idle client is dropped after this, freeing its thread

        def log_message(self, fmt, *args):  # quiet unless asked: one line per request is noise at scale
            if server.log_requests:
                super().log_message(fmt, *args)

        def _reply(self, status, payload, content_type="application/json"):
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            path = self.path.split("?")[0]
            server._count(path if path in routes_post or path in routes_get else "other", status)

        def _error(self, e: RequestError):
            self._reply(e.status, {"error": str(e), "error_type": e.error_type})

        def _authorized(self):
            if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            self._error(RequestError(401, "missing or wrong API key (Authorization: Bearer ...)", "Unauthorized"))
            return False

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorized():
                return
            path = self.path.split("?")[0]
            if path == "/health":
                self._reply(200, {"status": "ok"})
            elif path == "/info":
                self._reply(200, server.info())
            elif path == "/metrics":
                self._reply(200, server.metrics(), "text/plain; version=0.0.4")
            else:
                self._error(RequestError(404, f"no route GET {path}; routes: GET /health /info /metrics, POST "
                                         f"{' '.join(routes_post)}", "NotFound"))

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0]
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                self.close_connection = True  # the chunked body is not read: the connection cannot be reused
                return self._error(RequestError(411, "chunked request bodies are not supported: send the body "
                                                "with a Content-Length header", "LengthRequired"))
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not declared.isdigit():
                self.close_connection = True
                return self._error(RequestError(400, f"Content-Length must be a non-negative integer, got "
                                                f"{declared[:40]!r}", "BadRequest"))
            length = int(declared)
            if length > server.payload_limit:
                # read and drop a body of sane size first, so the client (still sending) gets the 413 rather than a
                # broken pipe; a huge one is refused at once
                left = length if length <= 32 * server.payload_limit else 0
                while left > 0:
                    chunk = self.rfile.read(min(1 << 20, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                self.close_connection = True
                return self._error(RequestError(413, f"request body of {length} bytes is over the payload limit "
                                                f"of {server.payload_limit} bytes"))
            raw = self.rfile.read(length) if length else b""
            if len(raw) < length:  # the client closed (or was cut off at shutdown) before sending the whole body
                self.close_connection = True
                return self._error(RequestError(400, f"incomplete request body: {len(raw)} of the {length} bytes "
                                                "that Content-Length announced arrived"))
            if not self._authorized():
                return
            if path not in routes_post:
                return self._error(RequestError(404, f"no route POST {path}; routes: {' '.join(routes_post)}",
                                                "NotFound"))
            try:
                body = json.loads(raw or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return self._error(RequestError(422, f"the request body is not valid JSON: {e}"))
            except RecursionError:
                return self._error(RequestError(422, "the request body nests JSON too deeply to read"))
            try:
                self._reply(200, routes_post[path](body))
            except RequestError as e:
                self._error(e)
            except Exception as e:  # a bug or a backend failure: answered (500), never a dropped connection
                logger.exception("POST %s failed", path)
                self._error(RequestError(500, f"internal error: {type(e).__name__}: {e}", "Backend"))

    return Handler


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------
def add_subcommands(sub):
    from llm2vec_fast.cli import _model_options

    p = sub.add_parser("serve", help="serve embeddings over HTTP (TEI and OpenAI routes)", description=(
        "Serve one model over HTTP: POST /embed (Text Embeddings Inference), POST /v1/embeddings (OpenAI), "
        "POST /similarity, POST /embed_all (token embeddings), POST /tokenize, GET /health /info /metrics. "
        "Concurrent requests share packed batches."))
    _model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-id", default=None, help="name reported by /info and OpenAI responses")
    p.add_argument("--max-client-batch-size", type=int, default=32, help="most inputs per request")
    p.add_argument("--max-batch-texts", type=int, default=4096, help="most texts merged into one encode call")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="token budget per packed batch")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="wait this long for more requests before "
                   "encoding (default 0: encode at once; requests arriving meanwhile join the next batch)")
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="waiting requests before 429")
    p.add_argument("--payload-limit", type=int, default=2_000_000, help="largest request body in bytes")
    p.add_argument("--auto-truncate", action="store_true", help="cut texts longer than max_length when a request "
                   "does not say truncate (default: refuse them with 413, as TEI does)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    p.add_argument("--read-timeout", type=float, default=60.0, help="seconds a connection may wait for the client's "
                   "next bytes before it is dropped (stalled and idle clients)")
    p.add_argument("--max-connections", type=int, default=None, help="open connections at once; more are answered "
                   "503 (default: twice --max-concurrent-requests)")
    p.add_argument("--log-requests", action="store_true", help="one log line per request on stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    import socket
    import sys

    from llm2vec_fast.cli import CLIError, load_model

    # the port first: a busy one is reported before the model loads, not after
    try:
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as e:
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from e
    l2v = load_model(args)
    server = EmbeddingServer(l2v, args.host, args.port, model_id=args.model_id,
                             max_client_batch_size=args.max_client_batch_size, max_batch_texts=args.max_batch_texts,
                             max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                             max_concurrent_requests=args.max_concurrent_requests, payload_limit=args.payload_limit,
                             auto_truncate=args.auto_truncate, api_key=args.api_key, log_requests=args.log_requests,
                             read_timeout=args.read_timeout, max_connections=args.max_connections)
    # SIGTERM (docker stop, kill) stops accepting, lets the worker finish what is queued, then exits
    import signal

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown, daemon=True).start())
    info = server.info()
    print(f"llm2vec-fast serving {info['model_id']} ({info['dimensions']} dims, {info['device']}, {info['dtype']}) "
          f"on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("llm2vec-fast: server stopped", file=sys.stderr, flush=True)
    return 0


__all__ = ["EmbeddingServer", "Batcher", "RequestError"]
