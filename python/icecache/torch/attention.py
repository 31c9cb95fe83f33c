"""Decode attention with the KV in IceCache, in PyTorch.

``OffloadedKV`` keeps one sequence's KV in an IceCache session:

* ``prefill(keys, values)``: the prompt's KV, [layers, kv_heads, n,
  head_dim] (fp16, bf16 or fp32, any device), goes to the session through a
  shm staging buffer.
* Per decode step and layer: ``append(layer, k, v)`` adds the new token's
  K/V ([kv_heads, head_dim]) to a short tail the engine keeps on its device;
  ``attend(layer, q)`` sends the layer's queries ([q_heads, head_dim])
  through the session's DecodeStep stream, reads the selected pages where
  the daemon wrote them, and returns softmax(q K^T / sqrt(d)) V over those
  pages plus the tail ([q_heads, head_dim], q's dtype and device).
* When the tail reaches ``flush_tokens`` at the start of a step (layer 0's
  append) it is appended to the session, so the daemon holds tokens
  [0, T_daemon) and the tail [T_daemon, T): no token is counted twice.

GQA: query head h attends with KV head h // (q_heads / kv_heads). Scores
and softmax run in float32 whatever the KV dtype. RoPE: engines usually
store keys already rotated, and nothing is needed. A caller that stores
keys before RoPE passes ``rope(keys, positions) -> keys`` (keys [kv_heads,
n, head_dim], positions [kv_heads, n], int64, -1 for padding); the token
positions of the fetched pages are then requested from the daemon and the
tail's are known.

Where pages land: a ShmBuffer (host memory; copied to q's device for the
selected slots only) or a CudaBuffer (GPU memory, read in place).

Not thread-safe: one OffloadedKV per sequence, used by one thread.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..buffers import CudaBuffer, ShmBuffer
from ..client import Client
from ..errors import FailedPreconditionError, InvalidArgumentError
from ..types import DType, FetchLayout, SelectOptions, SessionSpec, Selector, StepResult

__all__ = ["OffloadedKV", "attention_over_pages", "full_attention", "page_slots_per_head"]

Rope = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_TORCH_DTYPE = {DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16, DType.FLOAT32: torch.float32}


def full_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Exact decode attention: q [q_heads, d], keys/values [kv_heads, n, d]
    -> [q_heads, d] (float32 math, q's dtype out)."""
    kv_heads, _, d = keys.shape
    g = q.shape[0] // kv_heads
    qf = q.float().reshape(kv_heads, g, d)
    s = torch.matmul(qf, keys.float().transpose(1, 2)) / math.sqrt(d)
    out = torch.matmul(torch.softmax(s, dim=-1), values.float())
    return out.reshape(q.shape[0], d).to(q.dtype)


def page_slots_per_head(budget_tokens: int, page_tokens: int, sink_tokens: int, recent_tokens: int) -> int:
    """Most page blocks one KV head can take in a fetch: the budget's pages,
    plus one page per forced sink and recent token (an mdci layout may
    scatter them), plus one for a partial page."""
    return -(-budget_tokens // page_tokens) + sink_tokens + recent_tokens + 1


def _gather_index(layout: FetchLayout, want_positions: bool):
    """Per KV head: slot indices [H, n] (padded with 0), valid rows [H, n, P]
    and, when asked, positions [H, n*P] (-1 where invalid)."""
    heads = layout.heads
    n = max((len(h.slots) for h in heads), default=0)
    p = layout.page_tokens
    slots = np.zeros((len(heads), max(n, 1)), dtype=np.int64)
    fills = np.zeros((len(heads), max(n, 1)), dtype=np.int64)
    for i, h in enumerate(heads):
        k = len(h.slots)
        slots[i, :k] = h.slots
        fills[i, :k] = h.fills
    valid = np.arange(p)[None, None, :] < fills[:, :, None]
    positions = None
    if want_positions:
        positions = np.full((len(heads), max(n, 1) * p), -1, dtype=np.int64)
        for i, h in enumerate(heads):
            pos = np.asarray(h.positions, dtype=np.int64)
            positions[i][valid[i].reshape(-1)] = pos
    return slots, valid, positions


def attention_over_pages(
    q: torch.Tensor,
    region: torch.Tensor,
    layout: FetchLayout,
    tail_keys: Optional[torch.Tensor] = None,
    tail_values: Optional[torch.Tensor] = None,
    rope: Optional[Rope] = None,
    tail_positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of q [q_heads, d] over the fetched pages of one layer plus a
    tail [kv_heads, t, d].

    ``region``: the layer's page blocks as [slots, 2, page_tokens, d] (K block
    then V block), where the daemon wrote them (host or device memory).
    Rows past a page's fill are masked out (the daemon zeroes them, and a
    zero key would still get weight).
    """
    kv_heads = len(layout.heads)
    if kv_heads == 0 or q.shape[0] % kv_heads:
        raise InvalidArgumentError(
            f"queries have {q.shape[0]} heads, not a multiple of the layout's {kv_heads} KV heads"
        )
    d, p = layout.head_dim, layout.page_tokens
    slots, valid, positions = _gather_index(layout, rope is not None)
    idx = torch.from_numpy(slots).to(region.device)
    blocks = region[idx]  # [H, n, 2, P, d]
    dev = q.device
    keys = blocks[:, :, 0].reshape(kv_heads, -1, d).to(dev, torch.float32)
    values = blocks[:, :, 1].reshape(kv_heads, -1, d).to(dev, torch.float32)
    mask = torch.from_numpy(valid.reshape(kv_heads, -1)).to(dev)
    if rope is not None:
        keys = rope(keys, torch.from_numpy(positions).to(dev))
    if tail_keys is not None and tail_keys.shape[1] > 0:
        tk = tail_keys.to(dev, torch.float32)
        if rope is not None:
            if tail_positions is None:
                raise InvalidArgumentError("rope needs the tail's positions (tail_positions)")
            tk = rope(tk, tail_positions.to(dev).expand(kv_heads, -1))
        keys = torch.cat([keys, tk], dim=1)
        values = torch.cat([values, tail_values.to(dev, torch.float32)], dim=1)
        mask = torch.cat([mask, torch.ones(kv_heads, tk.shape[1], dtype=torch.bool, device=dev)], dim=1)
    g = q.shape[0] // kv_heads
    qf = q.to(torch.float32).reshape(kv_heads, g, d)
    s = torch.matmul(qf, keys.transpose(1, 2)) / math.sqrt(d)
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), values)
    return out.reshape(q.shape[0], d).to(q.dtype)


class OffloadedKV:
    """One sequence's KV in an IceCache session, with the decode-time tail.

    Args:
        client: a connected Client.
        layers, kv_heads, q_heads, head_dim: the model's attention shape.
        dtype: KV dtype (torch.float16, torch.bfloat16 or torch.float32).
        selector: "mdci", "exact-mdci", "exact", "quest", "streaming".
        budget_tokens, sink_tokens, recent_tokens: selection per step.
        page_tokens: tokens per page (0 = daemon default, 16).
        layer_reuse: layers sharing one selection (IceCache(r)); layers of a
            group after the first reuse the first layer's selection.
        prefetch: with layer_reuse > 1, the daemon writes a group's later
            layers in the background right after the first layer's selection
            (DecodeStream.step's prefetch_group), each into its own region of
            the buffer, so their attend() only waits for a flag. None (the
            default): on where layer_reuse > 1 and the buffer holds
            layer_reuse regions; True: required (InvalidArgumentError
            otherwise); False: off.
        in_place: every layer keeps its own region of a host buffer between
            steps, and the daemon copies only the rows of newly selected
            tokens (DecodeStream.step's in_place; a quarter of the rows at
            32k tokens, docs/bench/inplace14_gather.md). Off by default: it
            takes a region per layer (layers x the region's bytes) and a
            ShmBuffer (InvalidArgumentError with a CudaBuffer).
        flush_tokens: tail length that triggers an append to the session.
        buffer: where pages land: None (a new ShmBuffer), or a CudaBuffer.
        rope: see the module docstring.
        ttl_s: session lease.
    """

    def __init__(
        self,
        client: Client,
        *,
        layers: int,
        kv_heads: int,
        q_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        selector: Union[str, Selector] = "mdci",
        budget_tokens: int = 256,
        sink_tokens: int = 4,
        recent_tokens: int = 0,
        page_tokens: int = 16,
        layer_reuse: int = 1,
        flush_tokens: int = 64,
        buffer: Optional[CudaBuffer] = None,
        rope: Optional[Rope] = None,
        ttl_s: float = 600.0,
        mdci_overrides: Optional[dict] = None,
        prefetch: Optional[bool] = None,
        in_place: bool = False,
    ) -> None:
        self.client = client
        self.spec = SessionSpec(
            layers=layers, kv_heads=kv_heads, q_heads=q_heads, head_dim=head_dim,
            dtype=DType.of(dtype), page_tokens=page_tokens, selector=Selector.parse(selector),
            layer_reuse=layer_reuse, ttl_s=ttl_s,
        )
        if mdci_overrides:
            from ..types import MdciParams

            self.spec.mdci = MdciParams(**mdci_overrides)
        self.dtype = dtype
        self.rope = rope
        self.flush_tokens = max(1, flush_tokens)
        self.options = SelectOptions(
            budget_tokens=budget_tokens, sink_tokens=sink_tokens, recent_tokens=recent_tokens,
            want_positions=rope is not None,
        )
        # Arguments that need no session are checked before one is created.
        if prefetch and max(1, layer_reuse) <= 1:
            raise InvalidArgumentError("prefetch needs layer_reuse > 1 (a group of layers to prefetch)")
        if in_place and isinstance(buffer, CudaBuffer):
            raise InvalidArgumentError("in_place writes need a host ShmBuffer, not a CudaBuffer")
        self.session = client.create_session(self.spec)
        self.session_id = self.session.id
        self.page_tokens = self.session.spec.page_tokens
        self.layer_reuse = max(1, self.session.spec.layer_reuse)
        page_bytes = 2 * self.page_tokens * head_dim * DType.of(dtype).itemsize
        slots = kv_heads * page_slots_per_head(budget_tokens, self.page_tokens, sink_tokens, recent_tokens)
        self._region_bytes = slots * page_bytes
        self.in_place = bool(in_place)
        want_prefetch = self.layer_reuse > 1 if prefetch is None else bool(prefetch)
        group_bytes = self.layer_reuse * self._region_bytes
        # in_place: a region per layer, the groups side by side.
        groups = -(-layers // self.layer_reuse)
        all_bytes = groups * group_bytes
        need, why = self._region_bytes, ""
        if self.in_place:
            need, why = all_bytes, f", {all_bytes} for a region per layer (in_place)"
        elif prefetch:
            need, why = group_bytes, f", {group_bytes} for a group of {self.layer_reuse} with prefetch"
        self._own_buffer = buffer is None
        if buffer is not None and buffer.size < need:
            self.client.drop_session(self.session_id)
            raise InvalidArgumentError(
                f"page buffer has {buffer.size} bytes; {kv_heads} KV heads x "
                f"{slots // kv_heads} pages need {self._region_bytes} per layer{why}"
            )
        self.buffer: Union[ShmBuffer, CudaBuffer] = buffer or client.create_shm_buffer(
            all_bytes if self.in_place else group_bytes if want_prefetch else self._region_bytes)
        # On: each layer of a group reads its own region, at j x the group's
        # first layer's layer stride (where the daemon's prefetch writes it).
        self.prefetch = want_prefetch and self.buffer.size >= group_bytes
        self._regions: dict = {}
        self._stride = 0  # the layer stride of the current group's first layer
        self._region = self._region_tensor()
        self._stream = client.decode_stream(self.session_id, self.buffer)
        self._staging: Optional[ShmBuffer] = None
        self.daemon_tokens = 0
        self._tail_k: List[List[torch.Tensor]] = [[] for _ in range(layers)]
        self._tail_v: List[List[torch.Tensor]] = [[] for _ in range(layers)]
        self.last_step: Optional[StepResult] = None

    # -- storage --------------------------------------------------------------

    def _region_tensor(self, offset: int = 0) -> torch.Tensor:
        """The region of the buffer at ``offset`` as [slots, 2, page_tokens,
        head_dim] (cached per offset)."""
        if offset in self._regions:
            return self._regions[offset]
        d, p = self.spec.head_dim, self.page_tokens
        slots = self._region_bytes // (2 * p * d * DType.of(self.dtype).itemsize)
        shape = (slots, 2, p, d)
        if isinstance(self.buffer, CudaBuffer):
            flat = self.buffer.tensor.view(torch.uint8).reshape(-1)[offset : offset + self._region_bytes]
            t = flat.view(self.dtype).reshape(shape)
        else:
            t = self.buffer.tensor(offset, shape, self.dtype)
        self._regions[offset] = t
        return t

    def _stage(self, nbytes: int) -> ShmBuffer:
        if self._staging is None or self._staging.size < nbytes:
            if self._staging is not None:
                self._staging.close()
            self._staging = self.client.create_shm_buffer(max(nbytes, 1 << 20))
        return self._staging

    def prefill(self, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Appends the prompt's KV, [layers, kv_heads, n, head_dim]; returns
        the session's token count. Must come before any decode step."""
        if any(self._tail_k[0]):
            raise FailedPreconditionError("prefill after decode steps began; use append()")
        n = int(keys.shape[2]) if keys.dim() == 4 else 0
        staging = self._stage(self.spec.chunk_bytes(max(n, 1)))
        self.daemon_tokens = self.client.append_kv(self.session_id, keys, values, buffer=staging)
        return self.daemon_tokens

    @property
    def tokens(self) -> int:
        """Tokens of the sequence: in the session plus in the tail (as seen
        by the last layer)."""
        return self.daemon_tokens + len(self._tail_k[-1])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Adds the new token's K and V ([kv_heads, head_dim]) of ``layer``.
        On layer 0, a full tail is first flushed to the session."""
        want = (self.spec.kv_heads, self.spec.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise InvalidArgumentError(
                    f"{name} of layer {layer} has shape {list(t.shape)}; want [kv_heads={want[0]}, head_dim={want[1]}]"
                )
        if layer == 0 and len(self._tail_k[0]) >= self.flush_tokens:
            self.flush()
        self._tail_k[layer].append(k.to(self.dtype))
        self._tail_v[layer].append(v.to(self.dtype))

    def flush(self) -> None:
        """Appends the tail (equal length on every layer) to the session."""
        t = len(self._tail_k[0])
        if t == 0:
            return
        if any(len(x) != t for x in self._tail_k):
            raise FailedPreconditionError("flush in the middle of a step: layers hold different tails")
        keys = torch.stack([torch.stack(x, dim=1) for x in self._tail_k])  # [L, H, t, d]
        values = torch.stack([torch.stack(x, dim=1) for x in self._tail_v])
        staging = self._stage(self.spec.chunk_bytes(t))
        self.daemon_tokens = self.client.append_kv(self.session_id, keys, values, buffer=staging)
        self._tail_k = [[] for _ in range(self.spec.layers)]
        self._tail_v = [[] for _ in range(self.spec.layers)]

    # -- decode ---------------------------------------------------------------

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention output [q_heads, head_dim] of ``layer`` for the queries
        q [q_heads, head_dim] over the selected pages plus the tail."""
        if tuple(q.shape) != (self.spec.q_heads, self.spec.head_dim):
            raise InvalidArgumentError(
                f"queries of layer {layer} have shape {list(q.shape)}; want "
                f"[q_heads={self.spec.q_heads}, head_dim={self.spec.head_dim}]"
            )
        tk = self._tail(self._tail_k[layer])
        tv = self._tail(self._tail_v[layer])
        if self.daemon_tokens == 0:  # nothing offloaded yet: the tail is everything
            return full_attention(q, tk, tv)
        place = layer % self.layer_reuse
        reuse = place != 0
        opts = self.options
        if reuse:
            opts = SelectOptions(**{**opts.__dict__, "reuse_group_selection": True})
        # With prefetch, layer j of a group at j x the first layer's stride
        # from the group's start (the offset the daemon's background write
        # used); in place, every group at its own place in the buffer.
        base = (layer - place) * self._region_bytes if self.in_place else 0
        within = self._region_bytes if self.in_place else 0
        if self.prefetch:
            within = self._stride
        offset = base + place * within
        step = self._stream.step(layer, None if reuse else q, offset=offset, options=opts,
                                 prefetch_group=self.prefetch and not reuse, in_place=self.in_place)
        self.last_step = step
        if self.prefetch and not reuse:
            self._stride = step.layout.layer_stride_bytes
        region = self._region_tensor(offset) if offset else self._region
        tail_pos = None
        if self.rope is not None:
            tail_pos = torch.arange(self.daemon_tokens, self.daemon_tokens + tk.shape[1], device=q.device)
        return attention_over_pages(q, region, step.layout, tk, tv, self.rope, tail_pos)

    def _tail(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        if not parts:
            return torch.empty(self.spec.kv_heads, 0, self.spec.head_dim, dtype=self.dtype)
        return torch.stack(list(parts), dim=1)

    def close(self) -> None:
        """Closes the stream, drops the session, releases the buffers."""
        self._region = None  # views of the page buffer: let it unmap
        self._regions = {}
        try:
            self._stream.close()
        finally:
            try:
                self.client.drop_session(self.session_id)
            finally:
                if self._own_buffer:
                    self.buffer.close()
                if self._staging is not None:
                    self._staging.close()

    def __enter__(self) -> "OffloadedKV":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
