"""Data-parallel encoding: one worker process per device, each holding its own copy of the model.

    pool = l2v.start_multi_process_pool(["cuda:0", "cuda:1", "cuda:2", "cuda:3"])
    emb = l2v.encode(texts, pool=pool)            # rows in input order, as a single-device call gives them
    l2v.stop_multi_process_pool(pool)
    emb = l2v.encode(texts, device=["cuda:0", "cuda:1"])   # a pool for one call

The parent sorts the texts by length, cuts them into chunks and queues them; each worker takes the next chunk when it
is free (so a slower device takes fewer), encodes it with the usual packed, token-budget batches and sends the rows
back. Output precision and Matryoshka truncation are applied in the parent over all rows, so int8 ranges are those
of the whole call. A failing chunk does not stop the others; the call then raises with the worker's error. A worker
that dies (killed, out of host memory) makes the call raise instead of waiting forever.
"""
from __future__ import annotations

import math
import os
import queue
import time

import numpy as np
import torch

from ._io import check_count

_READY_TIMEOUT_S = 900  # loading a 7B model onto a device takes a while
# what a reloading worker copies from the parent's encoder after from_pretrained
_ENCODER_STATE = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction", "prompts", "instruction_span",
                  "template_name")


class EncodePool:
    """Worker processes (``spawn``) over ``devices``; see :meth:`LLM2Vec.start_multi_process_pool`."""

    def __init__(self, l2v, devices, threads_per_worker=None, load="share"):
        import torch.multiprocessing as mp

        if load not in ("share", "reload"):
            raise ValueError(f"load must be 'share' or 'reload', got {load!r}")
        if load == "reload" and getattr(l2v, "_source", None) is None:
            raise ValueError("load='reload' needs a model built by LLM2Vec.from_pretrained (its arguments are what the "
                             "workers load); use load='share'")
        self.devices = _check_devices(devices)
        ctx = mp.get_context("spawn")
        self._in, self._out = ctx.Queue(), ctx.Queue()
        self._call = 0
        if threads_per_worker is None:
            n_cpu = sum(d.startswith("cpu") for d in self.devices)
            threads_per_worker = max(1, (os.cpu_count() or 1) // max(1, n_cpu)) if n_cpu else 1
        home = l2v.device
        if load == "reload":
            payload = ("reload", l2v._source, {k: getattr(l2v, k) for k in _ENCODER_STATE})
        else:
            # the model travels to the workers through shared host memory, once; the parent's copy goes back home
            l2v.model.to("cpu")
            try:
                l2v.model.share_memory()
            except RuntimeError as e:
                l2v.model.to(home)
                raise RuntimeError(f"could not put the model in shared memory ({e}); a container's /dev/shm is often "
                                   "too small: start the pool with load='reload', or give it more (docker "
                                   "--shm-size)") from e
            payload = l2v
        self._procs = []
        try:
            for rank, dev in enumerate(self.devices):
                p = ctx.Process(target=_worker, args=(rank, dev, payload, self._in, self._out, threads_per_worker),
                                daemon=True, name=f"llm2vec-fast-encode-{rank}")
                p.start()
                self._procs.append(p)
        finally:
            if load == "share":
                l2v.model.to(home)
        self.hidden_size = int(l2v.model.config.hidden_size)
        self._wait_ready()

    def _wait_ready(self):
        ready, deadline = set(), time.monotonic() + _READY_TIMEOUT_S
        while len(ready) < len(self._procs):
            msg = self._get(deadline)
            kind, rank, err = msg[0], msg[1], msg[-1]
            if kind != "ready":
                continue
            if err is not None:
                self.close()
                raise RuntimeError(f"encode worker on {self.devices[rank]} failed to start: {err}")
            ready.add(rank)

    def _get(self, deadline=None):
        """The next message from a worker; raises if one has died or the deadline passed."""
        while True:
            try:
                return self._out.get(timeout=1.0)
            except queue.Empty:
                dead = [(d, p.exitcode) for d, p in zip(self.devices, self._procs, strict=True) if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"encode worker on {dead[0][0]} died (exit code {dead[0][1]}); the pool is "
                                       "closed, start a new one") from None
                if deadline is not None and time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError(f"encode workers did not start within {_READY_TIMEOUT_S} s") from None

    def encode(self, pairs, chunk_size=None, show_progress_bar=True, **encode_kwargs) -> torch.Tensor:
        """Embeddings ``[N, H]`` float32 (CPU) of ``(instruction, text)`` pairs, rows in input order."""
        from tqdm.auto import tqdm

        if not self._procs:
            raise RuntimeError("this pool is closed; start a new one with start_multi_process_pool()")
        n = len(pairs)
        out = torch.zeros(n, self.hidden_size, dtype=torch.float32)
        if n == 0:
            return out
        if chunk_size is None:
            chunk_size = min(5000, max(1, math.ceil(n / (8 * len(self._procs)))))
        else:
            check_count("chunk_size", chunk_size)
        # longest first and similar lengths together: each chunk packs tightly, the long tail does not come last
        order = np.argsort([-len(t) - len(i) for i, t in pairs], kind="stable")
        chunks = [order[a:a + chunk_size] for a in range(0, n, chunk_size)]
        self._call += 1
        for cid, idx in enumerate(chunks):
            self._in.put((self._call, cid, [list(pairs[i]) for i in idx], encode_kwargs))
        errors = []
        with tqdm(total=n, desc="Encoding", unit="text", disable=not show_progress_bar) as bar:
            pending = set(range(len(chunks)))
            while pending:
                msg = self._get()
                if msg[0] != "result" or msg[1] != self._call:
                    continue  # a stale message (a call that raised before collecting everything)
                _, _, cid, rank, rows, err = msg
                pending.discard(cid)
                if err is not None:
                    first = sorted(int(i) for i in chunks[cid])[:5]
                    errors.append(f"chunk {cid} (inputs {', '.join(map(str, first))}"
                                  f"{', ...' if len(chunks[cid]) > 5 else ''}) on {self.devices[rank]}: {err}")
                else:
                    out[torch.as_tensor(chunks[cid])] = torch.from_numpy(rows)
                bar.update(len(chunks[cid]))
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(chunks)} chunks failed; first: {errors[0]}")
        return out

    def close(self):
        """Stop the workers (idempotent)."""
        procs, self._procs = self._procs, []
        for _ in procs:
            self._in.put(None)
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        if procs:
            for q in (self._in, self._out):  # their feeder threads and semaphores end with the pool, not at exit
                q.close()
                q.join_thread()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _check_devices(devices):
    if isinstance(devices, (str, torch.device)) or not devices:
        raise ValueError(f"devices must be a non-empty list such as ['cuda:0', 'cuda:1'], got {devices!r}")
    out = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"{d!r} is not a device: {e}") from None
        if dev.type == "cuda":
            n = torch.cuda.device_count()
            idx = 0 if dev.index is None else dev.index
            if idx >= n:
                raise ValueError(f"device {d!r} does not exist: this machine has {n} CUDA device(s)")
            dev = torch.device("cuda", idx)
        out.append(str(dev))
    return out


def _worker(rank, device, payload, inq, outq, threads):
    """Worker loop: load once, then encode chunks until the ``None`` sentinel."""
    try:
        from llm2vec_fast.bidirectional import register

        register()  # transformers' attention registry is per process
        if device.startswith("cpu"):
            torch.set_num_threads(threads)
        else:
            torch.cuda.set_device(torch.device(device))
        if isinstance(payload, tuple) and payload[0] == "reload":
            from llm2vec_fast import LLM2Vec

            _, source, state = payload
            l2v = LLM2Vec.from_pretrained(**source, device=device)
            for k, v in state.items():
                setattr(l2v, k, v)
        else:
            l2v = payload
        l2v.model.to(device)
        l2v.model.eval()
        outq.put(("ready", rank, None))
    except Exception as e:  # the parent names the device and the cause
        outq.put(("ready", rank, f"{type(e).__name__}: {e}"))
        return
    while True:
        job = inq.get()
        if job is None:
            return
        call, cid, items, kwargs = job
        try:
            emb = l2v.encode(items, show_progress_bar=False, convert_to_tensor=True, **kwargs)
            outq.put(("result", call, cid, rank, emb.numpy(), None))
        except Exception as e:
            outq.put(("result", call, cid, rank, None, f"{type(e).__name__}: {e}"))
