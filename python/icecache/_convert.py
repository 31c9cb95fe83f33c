"""Conversions between the generated protobuf messages and icecache.types.

The only module besides client.py and decode_stream.py that touches
generated code.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InvalidArgumentError
from .types import (
    DaemonStats,
    DeviceWrite,
    DType,
    FetchLayout,
    HeadLayout,
    HeadSelection,
    MdciParams,
    PagedKvCache,
    SelectOptions,
    Selector,
    SessionInfo,
    SessionSpec,
    SizeClassInfo,
    TenantInfo,
)
from .v1 import admin_pb2, buffer_pb2, types_pb2


def from_unix_ms(ms: int) -> Optional[datetime]:
    return None if ms == 0 else datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)


def select_params(options: SelectOptions, out: types_pb2.SelectParams) -> None:
    if options.budget_tokens is not None:
        out.budget_tokens = options.budget_tokens
    if options.sink_tokens is not None:
        out.sink_tokens = options.sink_tokens
    if options.recent_tokens is not None:
        out.recent_tokens = options.recent_tokens
    out.want_positions = options.want_positions
    if options.granularity is not None:
        out.granularity = granularity_to_proto(options.granularity)


_GRANULARITY = {"page": types_pb2.GRANULARITY_PAGE, "token": types_pb2.GRANULARITY_TOKEN}


def granularity_to_proto(name: str) -> int:
    try:
        return _GRANULARITY[name]
    except KeyError:
        raise ValueError(f"granularity must be 'page' or 'token', got {name!r}") from None


def granularity_from_proto(value: int) -> Optional[str]:
    for name, v in _GRANULARITY.items():
        if v == value:
            return name
    return None


def session_config(spec: SessionSpec, out: types_pb2.SessionConfig) -> None:
    m = out.model
    m.layers = spec.layers
    m.kv_heads = spec.kv_heads
    m.q_heads = spec.q_heads
    m.head_dim = spec.head_dim
    m.dtype = int(DType.of(spec.dtype))
    out.page_tokens = spec.page_tokens
    out.selector.kind = int(Selector.parse(spec.selector))
    if spec.mdci is not None:
        p = spec.mdci
        out.selector.mdci.num_composite = p.num_composite
        out.selector.mdci.num_simple = p.num_simple
        out.selector.mdci.field_of_view = p.field_of_view
        out.selector.mdci.candidate_factor = p.candidate_factor
        out.selector.mdci.norm_headroom = p.norm_headroom
        out.selector.mdci.rebuild_fraction = p.rebuild_fraction
        out.selector.mdci.seed = p.seed
        if p.pq_factor is not None:
            out.selector.mdci.pq_factor = p.pq_factor
        if p.carry_keep_factor is not None:
            out.selector.mdci.carry_keep_factor = p.carry_keep_factor
        if p.insert_fit is not None:
            out.selector.mdci.insert_fit = p.insert_fit
    out.layer_reuse = spec.layer_reuse
    select_params(spec.defaults, out.defaults)
    out.ttl_ms = int(round(spec.ttl_s * 1000))
    out.pinned = spec.pinned


def _dtype(value: int) -> DType:
    try:
        return DType(value)
    except ValueError:
        return DType.FLOAT16


def _selector(value: int) -> Selector:
    try:
        return Selector(value)
    except ValueError:
        return Selector.DEFAULT


def session_info(info: types_pb2.SessionInfo) -> SessionInfo:
    c = info.config
    d = c.defaults
    mdci = c.selector.mdci
    spec = SessionSpec(
        layers=c.model.layers,
        kv_heads=c.model.kv_heads,
        q_heads=c.model.q_heads,
        head_dim=c.model.head_dim,
        dtype=_dtype(c.model.dtype),
        page_tokens=c.page_tokens,
        selector=_selector(c.selector.kind),
        layer_reuse=c.layer_reuse,
        defaults=SelectOptions(
            budget_tokens=d.budget_tokens if d.HasField("budget_tokens") else None,
            sink_tokens=d.sink_tokens if d.HasField("sink_tokens") else None,
            recent_tokens=d.recent_tokens if d.HasField("recent_tokens") else None,
            granularity=granularity_from_proto(d.granularity),
        ),
        ttl_s=c.ttl_ms / 1000.0,
        pinned=c.pinned,
        mdci=MdciParams(
            mdci.num_composite,
            mdci.num_simple,
            mdci.field_of_view,
            mdci.candidate_factor,
            mdci.norm_headroom,
            mdci.rebuild_fraction,
            mdci.seed,
            mdci.pq_factor if mdci.HasField("pq_factor") else None,
            mdci.carry_keep_factor if mdci.HasField("carry_keep_factor") else None,
            mdci.insert_fit if mdci.HasField("insert_fit") else None,
        )
        if c.selector.HasField("mdci")
        else None,
    )
    return SessionInfo(
        id=info.session_id,
        epoch=info.epoch,
        tenant=info.tenant,
        spec=spec,
        tokens=info.tokens,
        created=from_unix_ms(info.created_unix_ms),
        last_use=from_unix_ms(info.last_use_unix_ms),
        expires=from_unix_ms(info.expires_unix_ms),
        pinned=info.pinned,
        bytes=info.bytes,
        pages=info.pages,
        index_bytes=info.index_bytes,
        in_flight=info.in_flight,
        trees_built=getattr(info, "trees_built", 0),
        trees_total=getattr(info, "trees_total", 0),
        next_layer=getattr(info, "next_layer", 0),
        decode_keys=getattr(info, "decode_keys", 0),
        decode_keys_unrouted=getattr(info, "decode_keys_unrouted", 0),
    )


# The repeated fields below are handed out as the response's own read-only
# sequences (no copy): converting them to lists cost about 100 us per layer
# message, the bulk of the Python client's overhead (python/README.md).
def _positions(h: Any) -> Sequence[int]:
    """A head's positions: from ``positions_le`` (DecodeStep asks for them
    as little-endian int32 bytes) a read-only int32 array over the
    response's own bytes, no copy; else the repeated field."""
    if h.positions_le:
        return np.frombuffer(h.positions_le, dtype="<i4")
    return h.positions


def head_selection(h: types_pb2.HeadSelection) -> HeadSelection:
    return HeadSelection(
        kv_head=h.kv_head,
        pages=h.pages,
        fills=h.fills,
        scores=h.scores,
        positions=_positions(h),
        keys_touched=h.keys_touched,
    )


def fetch_layout(layout: types_pb2.FetchLayout, base: int = 0) -> FetchLayout:
    """``base``: the buffer's own offset in what the daemon maps (a
    CudaBuffer's base_offset); offsets come back relative to the buffer, as
    the caller gave them."""
    heads = [
        HeadLayout(
            kv_head=h.kv_head,
            pages=h.pages,
            slots=h.slots,
            fills=h.fills,
            byte_offsets=[b - base for b in h.byte_offsets] if base else h.byte_offsets,
            positions=_positions(h),
        )
        for h in layout.heads
    ]
    return FetchLayout(
        buffer_id=layout.buffer_id,
        offset=layout.offset - base,
        total_bytes=layout.total_bytes,
        page_bytes=layout.page_bytes,
        first_layer=layout.first_layer,
        num_layers=layout.num_layers,
        layer_stride_bytes=layout.layer_stride_bytes,
        page_tokens=layout.page_tokens,
        head_dim=layout.head_dim,
        dtype=_dtype(layout.dtype),
        heads=heads,
        rows_copied=layout.rows_copied,
        rows_kept=layout.rows_kept,
    )


def tenant_info(t: admin_pb2.TenantInfo) -> TenantInfo:
    return TenantInfo(t.tenant, t.bytes_used, t.quota_bytes, t.sessions, t.buffers)


def daemon_stats(r: admin_pb2.GetStatsResponse) -> DaemonStats:
    return DaemonStats(
        epoch=r.epoch,
        start=from_unix_ms(r.start_unix_ms),
        capacity_bytes=r.capacity_bytes,
        bytes_reserved=r.bytes_reserved,
        bytes_used=r.bytes_used,
        sessions=r.sessions,
        buffers=r.buffers,
        evictions=r.evictions,
        expirations=r.expirations,
        in_flight=r.in_flight,
        draining=r.draining,
        sessions_created=r.sessions_created,
        sessions_dropped=r.sessions_dropped,
        admissions_rejected=r.admissions_rejected,
        frames_used=r.frames_used,
        frames_free=r.frames_free,
        huge_pages=r.huge_pages,
        size_classes=[
            SizeClassInfo(c.frame_bytes, c.frames_used, c.frames_free, c.bytes_reserved)
            for c in r.size_classes
        ],
        tenants=[tenant_info(t) for t in r.tenants],
        pool_pinned_bytes=r.pool_pinned_bytes,
        gpu_pushes_in_place=r.gpu_pushes_in_place,
        gpu_pushes_staged=r.gpu_pushes_staged,
    )


def paged_kv(c: PagedKvCache, out: buffer_pb2.PagedKvCache) -> None:
    out.format = int(c.format)
    out.first_layer = c.first_layer
    out.num_layers = c.num_layers
    out.num_blocks = c.num_blocks
    out.block_tokens = c.block_tokens
    out.kv_heads = c.kv_heads
    out.head_dim = c.head_dim
    out.dtype = int(DType.of(c.dtype))
    out.layer_offsets_bytes.extend(int(o) for o in c.layer_offsets_bytes)
    out.base_offset_bytes = c.base_offset_bytes
    out.layer_stride = c.layer_stride
    out.kv_stride = c.kv_stride
    out.block_stride = c.block_stride
    out.token_stride = c.token_stride
    out.head_stride = c.head_stride


def _event(name: str, handle: bytes) -> bytes:
    handle = bytes(handle or b"")
    if handle and len(handle) != 64:
        raise InvalidArgumentError(
            f"{name} must be a cudaIpcEventHandle_t of 64 bytes (or empty), got {len(handle)} bytes"
        )
    return handle


def device_write(device: Optional[DeviceWrite], out: Any) -> None:
    """The device fields of a FetchPagesRequest or DecodeStepRequest, checked
    here first: events of 64 bytes, no block id twice."""
    if device is None:
        return
    wait, done = _event("wait_event", device.wait_event), _event("done_event", device.done_event)
    seen = set()
    for i, b in enumerate(device.block_ids):
        if int(b) in seen:
            raise InvalidArgumentError(
                f"block_ids: block {int(b)} is listed twice (position {i}); each page needs a block of its own"
            )
        seen.add(int(b))
    out.block_ids.extend(int(b) for b in device.block_ids)
    out.wait_event = wait
    out.done_event = done
