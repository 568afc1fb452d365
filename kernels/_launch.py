"""What several kernel launchers share (torch only, no triton): Philox seeds, the card's SM count, the device guard,
and host-side integer helpers."""
import contextlib
import functools

import torch


def new_seed() -> int:
    """A Philox seed from torch's CPU generator: ``torch.manual_seed`` fixes it, and checkpointing's RNG replay
    restores it (unlike Python's ``random``)."""
    return int(torch.randint(0, 1 << 62, (1,)).item())


def version_of(t: torch.Tensor):
    """Autograd's in-place counter of ``t`` (keys the caches of host copies primed for a device tensor); tensors made
    under ``torch.inference_mode`` have none (and cannot be edited in place outside it)."""
    return None if t.is_inference() else t._version


def kernel_seed(seed: int) -> int:
    """The seed as the kernels take it: always a 63-bit value >= 2**62, one argument type (i64) for every seed, so a
    new seed never recompiles."""
    return (int(seed) % (1 << 62)) + (1 << 62)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its index, or the current device)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


# host-side launch arithmetic: triton.cdiv and triton.next_power_of_2 are constexpr functions since triton 3.5, about
# 5 µs per call on the host (their arguments go through constexpr unwrapping), and a LoRA training step's launchers
# call them ~100 times per decoder layer; these are plain Python, for host code only (kernels keep tl.cdiv)
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def first_order_only(backward):
    """Decorate an autograd Function's ``backward``: run under ``create_graph=True`` (the engine then enables grad
    mode), it raises, since its gradients come from kernels with no graph of their own and a loss on them (a gradient
    penalty) would silently miss every second-order term. (``once_differentiable`` is not enough: its error node is
    skipped when the gradient loss also reaches the input through a first-order path.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(ctx).__name__.removesuffix('Backward')}: double backward is not supported "
                               "(this backward ran with create_graph=True; its kernel gradients have no graph, so "
                               "second-order terms would be lost): use the PyTorch twin in llm2vec_fast.kernels."
                               "reference for higher-order gradients")
        return backward(ctx, *grads)

    return wrapper


def device_of(t):
    """A context that makes ``t``'s CUDA device the current one, where it is not already (else a no-op): Triton
    launches on the *current* device and stream, so a kernel on tensors of ``cuda:1`` while ``cuda:0`` is current
    would run on the wrong GPU (an illegal access, or a race with the tensors' own stream)."""
    if isinstance(t, torch.Tensor) and t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorate a public op whose first argument is a tensor: it runs with that tensor's device current
    (:func:`device_of`); its autograd backward then runs on autograd's thread for that device, which sets it."""

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        with device_of(x):
            return fn(x, *args, **kwargs)

    return wrapper
