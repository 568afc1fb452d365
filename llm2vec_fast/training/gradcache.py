"""GradCache (Gao et al., 2021): contrastive training with a large batch in the memory of a small one.

The contrastive loss couples every example of the batch, so the batch cannot simply be split into accumulation
steps. GradCache splits the *encoder* work instead:

1. encode the batch chunk by chunk without autograd, keeping only the representations (and each chunk's RNG state);
   the last chunk runs with autograd and keeps its graph (``KEEP_LAST_CHUNK``): it is never encoded twice;
2. compute the loss on the cached representations and its gradient with respect to them (cheap: [N, H]);
3. back-propagate the cached gradient through the kept chunk (``backward(reps · grad)``), then encode every other
   chunk again with autograd, replaying its RNG state so dropout draws the same masks, and back-propagate through it;
   parameter gradients accumulate over chunks.

The result equals the full-batch gradient (exactly, up to float summation order), at the cost of a second forward of
all chunks but one, in the memory of one chunk's activations.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

import torch


class RandState:
    """The CPU generator's state and, for a CUDA device, that device's generator state; ``replay()`` restores them
    inside a forked RNG scope so the caller's stream is left where it was."""

    def __init__(self, device: torch.device | None = None):
        self.device = None
        if device is not None and torch.device(device).type == "cuda":
            # fork_rng takes CUDA device indices
            idx = torch.device(device).index
            self.device = idx if idx is not None else torch.cuda.current_device()
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def chunked(items: Sequence, size: int | Sequence[int]) -> list:
    """Consecutive chunks of ``items``: of ``size`` items each (the last one shorter), or, for a sequence of sizes,
    of those sizes in order (they must add up to ``len(items)``)."""
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        return [items[i:i + size] for i in range(0, len(items), size)]
    sizes = [int(n) for n in size]
    if any(n < 1 for n in sizes) or sum(sizes) != len(items):
        raise ValueError(f"chunk sizes must be >= 1 and add up to the {len(items)} items, got {sizes}")
    starts = [0, *itertools.accumulate(sizes)][:-1]
    return [items[a:a + n] for a, n in zip(starts, sizes, strict=True)]


def token_chunk_sizes(lengths: Sequence[int], budget: int) -> list[int]:
    """Sizes of consecutive chunks of items whose token ``lengths`` add up to at most ``budget`` each (an item longer
    than the budget forms a chunk alone): GradCache chunks bounded by activation memory rather than item count."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"the token budget of a GradCache chunk must be an int >= 1, got {budget!r}")
    sizes, n, used = [], 0, 0
    for length in lengths:
        if n and used + length > budget:
            sizes.append(n)
            n, used = 0, 0
        n, used = n + 1, used + int(length)
    if n:
        sizes.append(n)
    return sizes


def grad_cache_step(encode: Callable[[Sequence], torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    items: Sequence, chunk_size: int | Sequence[int],
                    backward: Callable[[torch.Tensor], None] | None = None,
                    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """One GradCache step over ``items``; parameter gradients are accumulated, the loss (detached) returned.

    Args:
        encode: ``encode(chunk_of_items) -> reps [len(chunk), H]`` (runs the model; twice per chunk but the last).
        loss_fn: ``loss_fn(reps [len(items), H]) -> scalar``, on all representations in item order.
        items: the whole batch (e.g. queries + positives + negatives, concatenated).
        chunk_size: items per encoder call, or the sizes of consecutive chunks (e.g. from
            :func:`token_chunk_sizes`).
        backward: how to back-propagate a chunk's surrogate (default ``Tensor.backward``; the Trainer passes
            ``accelerator.backward`` with its loss scaling).
        no_sync: context manager factory that suspends DDP gradient all-reduce; every forward and backward with
            autograd but the last back-propagated runs inside it, so gradients are all-reduced once per step.
        device: the model's device, whose RNG state is saved and replayed per chunk (CPU state always is).
    """
    backward = backward or (lambda t: t.backward())
    chunks = chunked(items, chunk_size)
    keep = KEEP_LAST_CHUNK
    n_replay = len(chunks) - 1 if keep else len(chunks)

    def sync_scope(last):
        return no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()

    states, cached = [], []
    # 1. representations without autograd, but for the kept chunk's
    with torch.no_grad():
        for ch in chunks[:n_replay]:
            states.append(RandState(device))
            cached.append(encode(ch))
    kept = None
    if keep:
        with sync_scope(last=n_replay == 0):  # its backward is the step's last only when it is the only chunk
            kept = encode(chunks[-1])
        cached.append(kept.detach())
    reps = torch.cat(cached).detach().requires_grad_(True)
    # 2. loss and its gradient with respect to the representations only
    loss = loss_fn(reps)
    (grad,) = torch.autograd.grad(loss, reps)
    # 3. the kept chunk first (its graph is freed before any re-encoding), then every other chunk re-encoded
    sizes = [len(ch) for ch in chunks]
    offsets = [sum(sizes[:i]) for i in range(len(chunks))]
    if kept is not None:
        g = grad[offsets[-1]:offsets[-1] + kept.shape[0]].to(kept.dtype)
        with sync_scope(last=n_replay == 0):
            backward((kept * g).sum())
        del kept
    for i in range(n_replay):
        with sync_scope(last=i == n_replay - 1):
            with states[i].replay():
                r = encode(chunks[i])
            g = grad[offsets[i]:offsets[i] + r.shape[0]].to(r.dtype)
            backward((r * g).sum())
    return loss.detach()


# the last chunk's forward keeps its graph for the backward instead of running twice (False: every chunk is encoded
# twice, the textbook GradCache; the gradients are the same)
KEEP_LAST_CHUNK = True
