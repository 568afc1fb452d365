"""Output precision and Matryoshka-style truncation for embeddings: pure functions that ``LLM2Vec.encode`` calls.

Semantics follow sentence-transformers' ``quantize_embeddings`` so that stored int8 / binary indexes built by either
library are interchangeable:

- ``float32``: a float32 copy.
- ``int8`` / ``uint8``: per-dimension scalar quantization into 256 buckets spanning ``[min, max]`` of that dimension,
  taken from ``ranges`` (shape ``[2, D]``), else from ``calibration_embeddings``, else from the embeddings themselves
  (which needs at least two rows). ``uint8`` is the bucket index ``floor((x - min) / step)`` clipped to 0..255 with
  ``step = (max - min) / 255``; ``int8`` is that index minus 128.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte, big-endian within the byte
  (``numpy.packbits``), giving ``ceil(D / 8)`` bytes per row; ``ubinary`` is the raw byte (uint8), ``binary`` the
  byte minus 128 (int8).
"""
from __future__ import annotations

import numpy as np
import torch

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _to_numpy(emb, name: str) -> np.ndarray:
    if isinstance(emb, torch.Tensor):
        return emb.detach().to(device="cpu", dtype=torch.float32).numpy()
    if isinstance(emb, np.ndarray):
        return emb
    if isinstance(emb, (list, tuple)):
        return np.asarray(emb, dtype=np.float32)
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(emb).__name__}")


def quantization_ranges(embeddings) -> np.ndarray:
    """Per-dimension ``[min; max]`` (shape ``[2, D]``, float32) of ``embeddings``: the calibration for int8/uint8."""
    emb = _to_numpy(embeddings, "embeddings")
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(
            f"int8/uint8 ranges need a 2-D array of at least 2 embeddings, got shape {tuple(emb.shape)}; pass "
            "calibration_embeddings or ranges from a representative set instead"
        )
    return np.vstack((emb.min(axis=0), emb.max(axis=0))).astype(np.float32)


def quantize_embeddings(embeddings, precision: str = "float32", ranges=None, calibration_embeddings=None) -> np.ndarray:
    """Convert float embeddings ``[N, D]`` (numpy or torch) to ``precision``; returns a numpy array.

    Args:
        embeddings: float embeddings, shape ``[N, D]`` (or ``[D]`` for one row; int8/uint8 then need ``ranges`` or
            ``calibration_embeddings``).
        precision: one of ``float32``, ``int8``, ``uint8``, ``binary``, ``ubinary`` (see the module docstring).
        ranges: optional ``[2, D]`` per-dimension minimum and maximum for int8/uint8.
        calibration_embeddings: optional ``[M, D]`` embeddings whose per-dimension range is used for int8/uint8 when
            ``ranges`` is not given (recommended: quantizing a small batch against its own range is unstable).

    Returns:
        ``float32 [N, D]``, ``int8 / uint8 [N, D]`` or ``int8 / uint8 [N, ceil(D / 8)]`` for the binary precisions.

    Raises:
        ValueError: unknown precision, integer input, mismatched ``ranges`` width, or too few rows to calibrate.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if isinstance(embeddings, (list, tuple)) and embeddings and all(
            hasattr(x, "shape") and len(x.shape) == 2 for x in embeddings):
        # token embeddings: one [L_i, D] array per text, quantized with one set of per-dimension buckets (as
        # sentence-transformers does), returned in the same layout
        parts = [_to_numpy(x, "embeddings") for x in embeddings]
        if len({x.shape[1] for x in parts}) != 1:
            raise ValueError(f"token embeddings must share one width, got {sorted({x.shape[1] for x in parts})}")
        flat = quantize_embeddings(np.concatenate(parts), precision, ranges, calibration_embeddings)
        return list(np.split(flat, np.cumsum([len(x) for x in parts])[:-1]))
    emb = _to_numpy(embeddings, "embeddings")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"embeddings to quantize must be floating point, got dtype {emb.dtype}")
    if emb.ndim not in (1, 2):
        raise ValueError(f"embeddings must be [N, D] or [D], got shape {tuple(emb.shape)}")
    if emb.dtype != np.float64:
        # float64 stays float64 (bucketed against float32 ranges, as sentence-transformers does); narrower floats
        # are computed in float32
        emb = emb.astype(np.float32, copy=False)
    dim = emb.shape[-1]

    if precision == "float32":
        return emb.astype(np.float32)
    if precision in ("binary", "ubinary"):
        packed = np.packbits(emb > 0, axis=-1)
        # int8 view of the same bits shifted by -128, as sentence-transformers stores "binary"
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed

    if emb.ndim == 2 and emb.shape[0] == 0 and ranges is None and calibration_embeddings is None:
        return np.zeros((0, dim), dtype=np.uint8 if precision == "uint8" else np.int8)  # nothing to calibrate on
    if ranges is None:
        if calibration_embeddings is not None:
            cal = _to_numpy(calibration_embeddings, "calibration_embeddings")
            if cal.ndim != 2 or cal.shape[1] != dim:
                raise ValueError(f"calibration_embeddings must have shape [M, {dim}], got {tuple(cal.shape)}")
            ranges = quantization_ranges(cal)
        else:
            ranges = quantization_ranges(emb)
    ranges = _to_numpy(ranges, "ranges").astype(np.float32)
    if ranges.shape != (2, dim):
        raise ValueError(f"ranges must have shape (2, {dim}), got {tuple(ranges.shape)}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    # a constant dimension would divide by zero; any step maps it to bucket 0
    steps = np.where(steps == 0, 1, steps)
    buckets = np.clip(np.floor((emb - starts) / steps), 0, 255)
    if precision == "uint8":
        return buckets.astype(np.uint8)
    return (buckets - 128).astype(np.int8)


def truncate_embeddings(embeddings, dim: int | None, renormalize: bool = False):
    """Keep the first ``dim`` dimensions (Matryoshka-style); L2-renormalize rows when ``renormalize``.

    Works on numpy arrays and torch tensors (returns the same kind). ``dim=None`` returns the input unchanged
    (renormalized if asked). Zero rows stay zero when renormalized.

    Raises:
        ValueError: ``dim`` < 1 or larger than the embedding width.
        TypeError: ``dim`` not an int.
    """
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"truncate_dim must be an int or None, got {type(dim).__name__} {dim!r}")
        width = embeddings.shape[-1]
        if dim < 1 or dim > width:
            raise ValueError(f"truncate_dim={dim} is out of range; expected 1 <= truncate_dim <= {width} (the width)")
        embeddings = embeddings[..., :dim]
    if renormalize:
        if isinstance(embeddings, torch.Tensor):
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=-1)
        else:
            norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
            embeddings = embeddings / np.where(norms == 0, 1, norms)
    return embeddings
