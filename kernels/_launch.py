"""What several kernel launchers share (torch only, no triton): Philox seeds and the card's SM count."""
import functools

import torch


def new_seed() -> int:
    """A Philox seed from torch's CPU generator: ``torch.manual_seed`` fixes it, and checkpointing's RNG replay
    restores it (unlike Python's ``random``)."""
    return int(torch.randint(0, 1 << 62, (1,)).item())


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
