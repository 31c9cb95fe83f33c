"""IceCache: the Python client of icecached, the KV-cache offload daemon.

    import icecache
    with icecache.Client() as client:            # $ICECACHE_SOCKET or the default socket
        spec = icecache.SessionSpec(layers=32, kv_heads=8, q_heads=32, head_dim=128)
        session = client.create_session(spec)
        with client.create_shm_buffer(64 << 20) as buf:
            client.append_kv(session.id, keys, values, buffer=buf)
            with client.decode_stream(session.id, buf) as stream:
                step = stream.step(layer=0, queries=q)   # pages of layer 0 now in buf

``icecache.torch`` computes decode attention over the fetched pages.
"""

from .buffers import CudaBuffer, ShmBuffer, reclaim_orphaned_shm
from .client import Client, SelectResult, kv_chunk_views, write_kv_chunk
from .connection import default_socket_candidates, default_socket_path
from .decode_stream import BatchDecodeStream, BatchEntry, BatchResult, DecodeStream
from .errors import *  # noqa: F401,F403  (one class per gRPC status code)
from .errors import __all__ as _errors_all
from .types import (
    DaemonStats,
    DeviceWrite,
    DrainInfo,
    DType,
    FetchLayout,
    HeadLayout,
    HeadSelection,
    MdciParams,
    PagedKvCache,
    PagedKvFormat,
    SelectOptions,
    Selector,
    SessionInfo,
    SessionSpec,
    SizeClassInfo,
    StepResult,
    TenantInfo,
    TOKEN_SLOT_PAGE,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "SelectResult",
    "DecodeStream",
    "BatchDecodeStream",
    "BatchEntry",
    "BatchResult",
    "ShmBuffer",
    "CudaBuffer",
    "reclaim_orphaned_shm",
    "kv_chunk_views",
    "write_kv_chunk",
    "default_socket_candidates",
    "default_socket_path",
    "DType",
    "Selector",
    "MdciParams",
    "PagedKvCache",
    "PagedKvFormat",
    "DeviceWrite",
    "SelectOptions",
    "SessionSpec",
    "SessionInfo",
    "HeadSelection",
    "HeadLayout",
    "TOKEN_SLOT_PAGE",
    "FetchLayout",
    "StepResult",
    "TenantInfo",
    "SizeClassInfo",
    "DaemonStats",
    "DrainInfo",
    *_errors_all,
]
