"""Turning numpy arrays and torch tensors into the bytes the daemon reads.

Query bytes (SelectPages, DecodeStep): one layer's query heads,
[q_heads][head_dim], float32, float16 or bfloat16, little endian. The shape
is checked by the daemon against the session (its message names the
session, the layer and the byte counts); here only what the daemon cannot
see is checked: a dtype it has no code for, or an array that is not a
block of numbers.
"""

from __future__ import annotations

import sys
from typing import Any, Tuple

import numpy as np

from .errors import InvalidArgumentError
from .types import DType

__all__ = ["query_bytes", "dtype_of", "as_numpy"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def dtype_of(x: Any) -> DType:
    """The DType of a numpy array or torch tensor; InvalidArgumentError for
    any other element type."""
    return DType.of(x.dtype)


def as_numpy(x: Any, what: str) -> np.ndarray:
    """A C-contiguous numpy array with the bytes of ``x`` (a torch tensor on
    any device, or anything numpy takes). bfloat16 comes back as int16."""
    if _is_torch(x):
        import torch

        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype is torch.bfloat16:
            t = t.view(torch.int16)
        return t.numpy()
    try:
        return np.ascontiguousarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} must be a numpy array or torch tensor: {e}") from e


def query_bytes(queries: Any, what: str = "queries") -> Tuple[bytes, int]:
    """(bytes, proto DType value) of one layer's queries."""
    if isinstance(queries, (bytes, bytearray, memoryview)):
        return bytes(queries), int(DType.FLOAT32)
    if not hasattr(queries, "dtype"):
        raise InvalidArgumentError(
            f"{what} must be a numpy array or torch tensor of [q_heads, head_dim], "
            f"got {type(queries).__name__}"
        )
    try:
        dtype = DType.of(queries.dtype)
    except InvalidArgumentError:
        raise InvalidArgumentError(
            f"{what} have dtype {queries.dtype}; send float32, float16 or bfloat16"
        ) from None
    if type(queries) is np.ndarray and queries.flags.c_contiguous:
        arr = queries
    else:
        arr = as_numpy(queries, what)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts here
        arr = arr.byteswap()
    return arr.tobytes(), int(dtype)
