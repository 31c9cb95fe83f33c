"""Plain data types of the IceCache API, mirroring ``client/client.h``.

No gRPC or protobuf type appears here; ``icecache._convert`` translates.
Sizes are bytes, token counts and positions 0-based integers, times are
timezone-aware ``datetime`` objects in UTC (``None`` where the daemon sent 0).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import List, Optional, Sequence

import numpy as np

from .errors import InvalidArgumentError

__all__ = [
    "DType",
    "Selector",
    "MdciParams",
    "SelectOptions",
    "SessionSpec",
    "SessionInfo",
    "HeadSelection",
    "HeadLayout",
    "FetchLayout",
    "StepResult",
    "TenantInfo",
    "SizeClassInfo",
    "DaemonStats",
    "DrainInfo",
    "PagedKvFormat",
    "PagedKvCache",
    "DeviceWrite",
]


class DType(enum.IntEnum):
    """Element type of keys, values and queries (values are the proto's)."""

    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT32 = 3

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.FLOAT32 else 2

    @property
    def numpy_storage(self) -> np.dtype:
        """The numpy dtype that holds this type's bytes (bfloat16, which
        numpy lacks, is held as int16 and viewed as torch.bfloat16)."""
        return {
            DType.FLOAT16: np.dtype("<f2"),
            DType.BFLOAT16: np.dtype("<i2"),
            DType.FLOAT32: np.dtype("<f4"),
        }[self]

    @staticmethod
    def of(dtype: object) -> "DType":
        """The DType of a numpy dtype, a torch dtype or a name ("float16",
        "fp16", "bfloat16", "bf16", "float32", "fp32"). InvalidArgumentError
        otherwise."""
        if isinstance(dtype, DType):
            return dtype
        hit = _DTYPE_CACHE.get(dtype)
        if hit is not None:
            return hit
        found = DType._lookup(dtype)
        try:
            _DTYPE_CACHE[dtype] = found
        except TypeError:  # unhashable: not cached
            pass
        return found

    @staticmethod
    def _lookup(dtype: object) -> "DType":
        name = str(dtype).replace("torch.", "")
        aliases = {
            "float16": DType.FLOAT16,
            "fp16": DType.FLOAT16,
            "half": DType.FLOAT16,
            "bfloat16": DType.BFLOAT16,
            "bf16": DType.BFLOAT16,
            "float32": DType.FLOAT32,
            "fp32": DType.FLOAT32,
            "float": DType.FLOAT32,
        }
        if name in aliases:
            return aliases[name]
        try:
            np_name = np.dtype(dtype).name  # type: ignore[arg-type]
        except TypeError:
            np_name = ""
        if np_name in aliases:
            return aliases[np_name]
        raise InvalidArgumentError(
            f"dtype {dtype} is not supported; use float16, bfloat16 or float32"
        )


_DTYPE_CACHE: dict = {}


class Selector(enum.IntEnum):
    """Page selection policy (``SelectorKind`` in types.proto)."""

    DEFAULT = 0  # the daemon's default (mdci)
    MDCI = 1
    EXACT_MDCI = 2
    EXACT = 3
    QUEST = 4
    STREAMING = 5
    ARKVALE = 6
    PQCACHE = 7
    SNAPKV = 8
    OMNIKV = 9
    MAGICPIG = 10
    MDCI_PUBLISHED = 11

    @property
    def label(self) -> str:
        """The spelling the C++ tools use: "mdci", "exact-mdci", ..."""
        return self.name.lower().replace("_", "-")

    @staticmethod
    def parse(name: "str | Selector") -> "Selector":
        """Accepts "default", "mdci", "exact-mdci", "exact", "quest",
        "streaming", "arkvale", "pqcache", "snapkv", "omnikv", "magicpig",
        "mdci-published" (or a Selector). InvalidArgumentError otherwise."""
        if isinstance(name, Selector):
            return name
        for s in Selector:
            if name == s.label:
                return s
        known = ", ".join(s.label for s in Selector)
        raise InvalidArgumentError(f"unknown selector '{name}'; known: {known}")


@dataclass
class MdciParams:
    """Parameters of the multi-level DCI index; 0 = the daemon's default."""

    num_composite: int = 0
    num_simple: int = 0
    field_of_view: int = 0
    candidate_factor: float = 0.0
    norm_headroom: float = 0.0
    rebuild_fraction: float = 0.0
    seed: int = 0
    # The product-quantised scan beside the tree: this many x budget tokens'
    # worth of the best pages by the 4-bit codes are scored exactly, and the
    # quality monitor keeps per head the cheaper of the scan and the tree's
    # descent that meets its target. None = the daemon's default (8 where
    # head_dim is a multiple of 8); 0 = the tree's descent only (no codes);
    # else 1..512 (docs/architecture.md §3.4).
    pq_factor: Optional[float] = None
    # The candidate carry-over: the selects that reuse a fresh one's
    # candidates score its best this many x budget tokens' worth of them.
    # None = the daemon's default (4); 0 = every candidate; else 1..512.
    carry_keep_factor: Optional[float] = None
    # Decode appends: a key within this many times the spread of the nearest
    # recent node with room joins it without being routed. None = the
    # daemon's default (2); 0 = every key routed (keys with no temporal
    # locality); else up to 64 (docs/architecture.md §5).
    insert_fit: Optional[float] = None


@dataclass
class SelectOptions:
    """Per-call selection parameters; None = the session's default."""

    budget_tokens: Optional[int] = None
    sink_tokens: Optional[int] = None
    recent_tokens: Optional[int] = None
    want_positions: bool = False
    # "page" (whole pages), "token" (the best tokens packed into slots:
    # HeadSelection.pages empty, positions listed), None = the session's.
    # A session's None (the default) selects per token for a DecodeStep into a
    # ShmBuffer and per page for a CudaBuffer, device fields and select_pages
    # (types.proto Granularity). A page-based engine passes "page".
    granularity: Optional[str] = None
    # On a layer that is not the first of its layer group: reuse the group's
    # selection (queries may then be empty).
    reuse_group_selection: bool = False


@dataclass
class SessionSpec:
    """Everything fixed at session creation (types.proto SessionConfig).
    0 means "the daemon's default" for page_tokens, layer_reuse and ttl."""

    layers: int
    kv_heads: int
    q_heads: int
    head_dim: int
    dtype: DType = DType.FLOAT16
    page_tokens: int = 0
    selector: Selector = Selector.DEFAULT
    layer_reuse: int = 0
    defaults: SelectOptions = field(default_factory=SelectOptions)
    ttl_s: float = 0.0  # lease in seconds; 0 = daemon default, else >= 1 s
    pinned: bool = False
    mdci: Optional[MdciParams] = None

    def chunk_bytes(self, tokens: int) -> int:
        """Bytes of one AppendKv chunk of ``tokens`` tokens:
        2 x layers x kv_heads x tokens x head_dim x dtype size."""
        return 2 * self.layers * self.kv_heads * tokens * self.head_dim * DType(self.dtype).itemsize

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.q_heads // self.kv_heads if self.kv_heads else 0


@dataclass
class SessionInfo:
    """A session as the daemon sees it."""

    id: str
    epoch: int
    tenant: str
    spec: SessionSpec  # with the daemon's defaults filled in
    tokens: int
    created: Optional[datetime]
    last_use: Optional[datetime]
    expires: Optional[datetime]
    pinned: bool
    bytes: int  # pool bytes held, charged to the quota
    pages: int
    index_bytes: int
    in_flight: int
    # Index progress: (layer group, KV head) trees built of the total, and
    # the next layer of a chunk arriving in layer ranges (0 = none pending).
    trees_built: int = 0
    trees_total: int = 0
    next_layer: int = 0
    # Decode keys the trees inserted one at a time since the daemon built or
    # loaded them, and of them those that joined a recent node without being
    # routed (MdciParams.insert_fit).
    decode_keys: int = 0
    decode_keys_unrouted: int = 0


@dataclass
class HeadSelection:
    """Selection for one KV head, pages in descending score order (forced
    sink / recent pages first, with score +inf)."""

    kv_head: int
    pages: Sequence[int]
    fills: Sequence[int]
    scores: Sequence[float]
    # When want_positions: fills[i] per page, concatenated (token granularity:
    # the selected tokens). A DecodeStep's: a read-only numpy int32 array over
    # the response's bytes; otherwise the response's read-only sequence.
    positions: Sequence[int]
    keys_touched: int


# HeadLayout.pages of a slot packed with selected tokens (token granularity:
# HeadSelection.pages empty, the tokens packed in order into slots of
# page_tokens rows, every slot full but the last; positions name them).
TOKEN_SLOT_PAGE = 4294967295


@dataclass
class HeadLayout:
    """Where one KV head's pages (or token slots, page TOKEN_SLOT_PAGE) landed."""

    kv_head: int
    pages: Sequence[int]
    slots: Sequence[int]  # page block index within one layer's region
    fills: Sequence[int]
    byte_offsets: Sequence[int]  # absolute offset of each K block (first layer)
    positions: Sequence[int]  # as HeadSelection.positions (a DecodeStep's: int32 array)


@dataclass
class FetchLayout:
    """Where fetched pages landed (types.proto FetchLayout): from ``offset``,
    per head, per page, a block of ``page_bytes`` = K (page_tokens x
    head_dim) then V; rows past a page's fill are zero. Layer j of a
    multi-layer fetch starts at offset + j x layer_stride_bytes.
    ``rows_copied`` / ``rows_kept`` (token granularity, per layer over every
    head): rows copied by this write, and rows left where the previous write
    of the layer put them (``in_place``); the positions then give each
    slot's token."""

    buffer_id: str
    offset: int
    total_bytes: int
    page_bytes: int
    first_layer: int
    num_layers: int
    layer_stride_bytes: int
    page_tokens: int
    head_dim: int
    dtype: DType
    heads: List[HeadLayout]
    rows_copied: int = 0
    rows_kept: int = 0

    @property
    def slots(self) -> int:
        """Page blocks per layer."""
        return self.layer_stride_bytes // self.page_bytes if self.page_bytes else 0


class StepResult:
    """One layer of a decode step: the selection and where it landed.

    ``heads`` (one HeadSelection per KV head) and ``layout`` are built from
    the response on first access, so a caller that reads only the layout
    pays for nothing else."""

    __slots__ = ("layer", "reused", "_heads", "_layout", "_raw", "_base")

    def __init__(
        self,
        layer: int,
        heads: Optional[List[HeadSelection]] = None,
        layout: Optional[FetchLayout] = None,
        reused: bool = False,
        raw: object = None,
        base: int = 0,
    ) -> None:
        self.layer = layer
        self._base = base  # the buffer's offset in the daemon's mapping (CudaBuffer.base_offset)
        self.reused = reused
        self._heads = heads
        self._layout = layout
        self._raw = raw  # the DecodeStepResponse, converted lazily

    @property
    def heads(self) -> List[HeadSelection]:
        if self._heads is None:
            from . import _convert

            self._heads = [_convert.head_selection(h) for h in self._raw.heads]  # type: ignore[attr-defined]
        return self._heads

    @property
    def layout(self) -> FetchLayout:
        if self._layout is None:
            from . import _convert

            self._layout = _convert.fetch_layout(self._raw.layout, self._base)  # type: ignore[attr-defined]
        return self._layout

    @property
    def prefetching(self) -> int:
        """prefetch_group on a group's first layer: the group's later layers
        being written in the background (0: none)."""
        return int(getattr(self._raw, "prefetching", 0))

    @property
    def prefetched(self) -> bool:
        """This layer's pages were already written by a prefetch."""
        return bool(getattr(self._raw, "prefetched", False))

    def __repr__(self) -> str:
        return f"StepResult(layer={self.layer}, reused={self.reused}, heads={self.heads!r}, layout={self.layout!r})"


class PagedKvFormat(enum.IntEnum):
    """Element layouts of an engine's paged KV cache (buffer.proto
    PagedKvFormat; docs/engines.md). The head_dim axis is contiguous."""

    VLLM_FLASH = 1  # [2, num_blocks, block_tokens, kv_heads, head_dim]
    FLASHINFER_NHD = 2  # [num_blocks, 2, block_tokens, kv_heads, head_dim]
    FLASHINFER_HND = 3  # [num_blocks, 2, kv_heads, block_tokens, head_dim]
    CUSTOM = 4  # the four *_stride fields


@dataclass
class PagedKvCache:
    """An engine's paged KV cache in one CUDA allocation (buffer.proto
    PagedKvCache): ``num_layers`` layer tensors at ``layer_offsets_bytes``
    (one per layer: tensor.data_ptr() minus the allocation's base), or, when
    that is empty, one all-layer tensor where layer l starts at
    ``base_offset_bytes`` + l x ``layer_stride`` elements (0 = one layer
    tensor's size). The daemon checks every layer tensor against the
    registered size before anything is written."""

    format: PagedKvFormat = PagedKvFormat.VLLM_FLASH
    first_layer: int = 0
    num_layers: int = 0
    num_blocks: int = 0
    block_tokens: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: DType = DType.FLOAT16
    layer_offsets_bytes: List[int] = field(default_factory=list)
    base_offset_bytes: int = 0
    layer_stride: int = 0
    # CUSTOM only: element strides (Tensor.stride()) of the K/V, block, token
    # and head axes.
    kv_stride: int = 0
    block_stride: int = 0
    token_stride: int = 0
    head_stride: int = 0


@dataclass
class DeviceWrite:
    """What a fetch or decode step into a CUDA IPC buffer asks besides the
    bytes (kv.proto FetchPagesRequest): ``block_ids``, this step's block
    table (the i-th page of every KV head lands in block block_ids[i] of the
    registered paged KV cache; ``offset`` is then unused), and the
    cudaIpcEventHandle_t bytes (64) of events made with
    cudaEventInterprocess: the daemon's stream waits on ``wait_event`` before
    writing and records ``done_event`` after (the call then returns without
    waiting for the copy)."""

    block_ids: Sequence[int] = ()
    wait_event: bytes = b""
    done_event: bytes = b""


@dataclass
class TenantInfo:
    tenant: str
    bytes_used: int
    quota_bytes: int  # 0 = none
    sessions: int
    buffers: int


@dataclass
class SizeClassInfo:
    frame_bytes: int
    frames_used: int
    frames_free: int
    bytes_reserved: int


@dataclass
class DaemonStats:
    epoch: int
    start: Optional[datetime]
    capacity_bytes: int
    bytes_reserved: int
    bytes_used: int
    sessions: int
    buffers: int
    evictions: int
    expirations: int
    in_flight: int
    draining: bool
    sessions_created: int
    sessions_dropped: int
    admissions_rejected: int
    frames_used: int
    frames_free: int
    huge_pages: bool
    size_classes: List[SizeClassInfo]
    tenants: List[TenantInfo]
    # Pushes to client GPUs: pool bytes the device reads in place (0: not
    # pinned), and pushes by path.
    pool_pinned_bytes: int = 0
    gpu_pushes_in_place: int = 0
    gpu_pushes_staged: int = 0


@dataclass
class DrainInfo:
    in_flight: int  # requests in flight when draining began
    sessions: int
