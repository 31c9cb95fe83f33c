"""icecache.Client: the Python client of icecached (mirrors client/client.h).

One Client holds one gRPC channel to the daemon: a Unix socket (default) or
a TCP address with TLS and a bearer token (see icecache.connection for the
search order and the environment variables). Every unary call is blocking
with the client's timeout; errors raise the IceCacheError subclass of the
daemon's status code with its message unchanged (icecache.errors).

Thread safety: a Client may be used from several threads. ``decode_step``
keeps one stream per session and serialises steps per session.
Ownership: buffers made by a Client refer to it; close them before it.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
from google.protobuf import json_format, text_format

from . import _convert
from .buffers import CudaBuffer, ShmBuffer
from .connection import Target, resolve_target
from .decode_stream import BatchDecodeStream, DecodeStream
from .errors import FailedPreconditionError, InvalidArgumentError, from_rpc_error
from .queries import as_numpy, dtype_of, query_bytes
from .types import (
    DaemonStats,
    DeviceWrite,
    DrainInfo,
    DType,
    FetchLayout,
    HeadSelection,
    PagedKvCache,
    SelectOptions,
    SessionInfo,
    SessionSpec,
    StepResult,
    TenantInfo,
)
from .v1 import (
    admin_pb2,
    admin_pb2_grpc,
    buffer_pb2,
    buffer_pb2_grpc,
    decode_ring_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    types_pb2,
)

__all__ = ["Client", "SelectResult"]

Buffer = Union[ShmBuffer, CudaBuffer, str]
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class SelectResult(List[HeadSelection]):
    """SelectPages' answer: one HeadSelection per KV head (a list), plus
    ``reused``: the layer group's selection was reused."""

    reused: bool = False


class Client:
    """A connection to icecached.

    Args:
        socket: Unix socket path (default: $ICECACHE_SOCKET, else the
            daemon's default search order). Ignored when ``address`` is set.
        address: TCP "host:port" of a remote daemon, always TLS (default:
            $ICECACHE_ADDRESS).
        ca: PEM file of the CA that signed the daemon's certificate (TCP).
        token: bearer token (TCP; default $ICECACHE_TOKEN).
        timeout: seconds for every unary call (decode streams have none).
        max_message_bytes: largest message sent or accepted.

    Connects lazily: the first call raises UnavailableError when no daemon
    listens.
    """

    def __init__(
        self,
        socket: Optional[str] = None,
        address: Optional[str] = None,
        ca: Optional[str] = None,
        token: Optional[str] = None,
        timeout: float = 30.0,
        max_message_bytes: int = 64 << 20,
        decode_ring: bool = True,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive, got {timeout}")
        if max_message_bytes < 4096:
            raise InvalidArgumentError(f"max_message_bytes must be >= 4096, got {max_message_bytes}")
        self.timeout = timeout
        # DecodeStreams over a shared-memory ring where the daemon accepts one
        # (decode_ring.py; as the C++ client's ClientOptions::decode_ring).
        self.decode_ring = decode_ring
        self._target: Target = resolve_target(socket, address, ca, token)
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if self._target.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=self._target.ca_pem)
            self._channel = grpc.secure_channel(self._target.grpc_target, creds, opts)
        else:
            self._channel = grpc.insecure_channel(self._target.grpc_target, opts)
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", "Bearer " + self._target.token),) if self._target.token else ()
        )
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)
        self._buffers = buffer_pb2_grpc.BufferServiceStub(self._channel)
        self._kv = kv_pb2_grpc.KvServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        # OpenDecodeRing for DecodeStream's shared-memory ring (decode_ring.py).
        self._rings = decode_ring_pb2_grpc.DecodeRingServiceStub(self._channel)
        self._health = self._channel.unary_unary(_HEALTH_CHECK)
        self._streams: Dict[str, DecodeStream] = {}
        self._specs: Dict[str, SessionSpec] = {}
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        """"unix:/path" or "host:port"."""
        return self._target.grpc_target

    def _call(self, method: Callable[..., Any], request: Any, name: str) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, name) from None

    # -- sessions ----------------------------------------------------------

    def create_session(self, spec: SessionSpec) -> SessionInfo:
        """Creates an empty session. Raises InvalidArgumentError (a field out
        of range; the message names it), ResourceExhaustedError (limits),
        UnavailableError (draining), PermissionDeniedError (uid refused)."""
        req = session_pb2.CreateSessionRequest()
        _convert.session_config(spec, req.config)
        info = _convert.session_info(self._call(self._sessions.CreateSession, req, "CreateSession").session)
        self._specs[info.id] = info.spec
        return info

    def get_session(self, session_id: str) -> SessionInfo:
        req = session_pb2.GetSessionRequest(session_id=session_id)
        info = _convert.session_info(self._call(self._sessions.GetSession, req, "GetSession").session)
        self._specs[info.id] = info.spec
        return info

    def list_sessions(self, all_tenants: bool = False) -> List[SessionInfo]:
        """The caller's sessions; ``all_tenants`` needs the admin role."""
        req = session_pb2.ListSessionsRequest(all_tenants=all_tenants)
        resp = self._call(self._sessions.ListSessions, req, "ListSessions")
        return [_convert.session_info(s) for s in resp.sessions]

    def keep_alive(self, session_ids: Union[str, Sequence[str]]) -> List[Optional[datetime]]:
        """Renews the leases; returns each new lease end."""
        ids = [session_ids] if isinstance(session_ids, str) else list(session_ids)
        req = session_pb2.KeepAliveRequest(session_ids=ids)
        resp = self._call(self._sessions.KeepAlive, req, "KeepAlive")
        return [_convert.from_unix_ms(ms) for ms in resp.expires_unix_ms]

    def drop_session(self, session_id: str) -> None:
        """Drops the session (and closes this client's decode stream of it)."""
        self.close_decode_stream(session_id, raise_error=False)
        self._specs.pop(session_id, None)
        self._call(self._sessions.DropSession, session_pb2.DropSessionRequest(session_id=session_id), "DropSession")

    # -- buffers -----------------------------------------------------------

    def create_shm_buffer(self, size: int) -> ShmBuffer:
        """Creates /dev/shm/icecache-<pid>-<random> (0600), maps and
        registers it. InvalidArgumentError for size <= 0, InternalError for
        OS errors, the daemon's error when registration fails (the file is
        removed again)."""
        return ShmBuffer(self, size)

    def cuda_buffer(self, tensor: Any, paged_kv: Optional[PagedKvCache] = None) -> CudaBuffer:
        """Registers a CUDA tensor by CUDA IPC (see CudaBuffer); with
        ``paged_kv``, as an engine's paged KV cache."""
        return CudaBuffer(self, tensor, paged_kv=paged_kv)

    def register_shm(self, path: str, size: int) -> str:
        """Registers an existing file under /dev/shm; returns the buffer id."""
        req = buffer_pb2.RegisterBufferRequest(host_shm=buffer_pb2.HostShm(path=path, size=size))
        return self._call(self._buffers.RegisterBuffer, req, "RegisterBuffer").buffer_id

    def register_cuda_ipc(
        self, handle: bytes, size: int, device_uuid: bytes, paged_kv: Optional[PagedKvCache] = None
    ) -> str:
        """Registers a cudaIpcMemHandle_t (64 bytes); returns the buffer id.
        With ``paged_kv`` the allocation is an engine's paged KV cache
        (fetches and decode steps may then name block ids). The daemon's
        errors: InvalidArgumentError / OutOfRangeError naming the paged_kv
        field, FailedPreconditionError "no CUDA device" on a daemon without
        one (the form is checked first, the same with or without a device)."""
        if len(handle) != 64:
            raise InvalidArgumentError(f"handle must be a cudaIpcMemHandle_t of 64 bytes, got {len(handle)} bytes")
        ipc = buffer_pb2.CudaIpc(handle=handle, size=size, device_uuid=device_uuid)
        if paged_kv is not None:
            _convert.paged_kv(paged_kv, ipc.paged_kv)
        req = buffer_pb2.RegisterBufferRequest(cuda_ipc=ipc)
        return self._call(self._buffers.RegisterBuffer, req, "RegisterBuffer").buffer_id

    def unregister_buffer(self, buffer_id: str) -> None:
        req = buffer_pb2.UnregisterBufferRequest(buffer_id=buffer_id)
        self._call(self._buffers.UnregisterBuffer, req, "UnregisterBuffer")

    @staticmethod
    def _buffer_ref(buffer: Buffer) -> Tuple[str, int]:
        """(buffer id, byte offset of the caller's offset 0 in it)."""
        if isinstance(buffer, str):
            return buffer, 0
        if isinstance(buffer, CudaBuffer):
            return buffer.buffer_id, buffer.base_offset
        if isinstance(buffer, ShmBuffer):
            if not buffer.registered:
                raise FailedPreconditionError(f"shm buffer {buffer.path} is not registered")
            return buffer.buffer_id, 0
        raise InvalidArgumentError(
            f"buffer must be a ShmBuffer, CudaBuffer or buffer id, got {type(buffer).__name__}"
        )

    # -- KV ----------------------------------------------------------------

    def session_spec(self, session_id: str) -> SessionSpec:
        """The session's spec (cached from create/get; one GetSession else)."""
        spec = self._specs.get(session_id)
        return spec if spec is not None else self.get_session(session_id).spec

    def append_kv(self, session_id: str, keys: Any, values: Any, buffer: Optional[ShmBuffer] = None, offset: int = 0) -> int:
        """Appends tokens from arrays: ``keys`` and ``values`` of shape
        [layers, kv_heads, n, head_dim] in the session's dtype (numpy or
        torch, any device). With ``buffer`` they are written straight into
        the shm buffer at ``offset`` (in as many pieces as the space after
        ``offset`` needs) and the daemon reads them there; without one they
        travel inline in the request. Returns the session's token count.

        InvalidArgumentError names the array, the shape or dtype it has and
        what the session wants; the daemon's errors as in append_kv_region.
        """
        spec = self.session_spec(session_id)
        n = _check_kv(spec, session_id, keys, values)
        per_token = spec.chunk_bytes(1)
        if buffer is None:
            data = np.concatenate([as_numpy(keys, "keys").ravel(), as_numpy(values, "values").ravel()])
            return self.append_kv_inline(session_id, data.tobytes(), n)
        fit = (buffer.size - offset) // per_token if offset >= 0 else 0
        if fit <= 0:
            raise InvalidArgumentError(
                f"shm buffer {buffer.buffer_id} has {buffer.size - offset} bytes after offset {offset}; "
                f"one token of session {session_id} needs {per_token}"
            )
        tokens = 0
        for start in range(0, n, fit):
            stop = min(n, start + fit)
            write_kv_chunk(buffer, offset, spec, keys[:, :, start:stop], values[:, :, start:stop])
            tokens = self.append_kv_region(session_id, buffer, offset, (stop - start) * per_token, stop - start)
        return tokens

    def append_kv_region(
        self, session_id: str, buffer: Buffer, offset: int, length: int, num_tokens: int,
        first_layer: int = 0, num_layers: int = 0,
    ) -> int:
        """Appends ``num_tokens`` tokens the caller wrote into buffer bytes
        [offset, offset + length) (layout: ``kv_chunk_views``). With
        ``num_layers`` > 0 the bytes hold only layers [first_layer,
        first_layer + num_layers) (whole layer groups, sent in order from
        layer 0; see append_kv_layers). Returns the tokens every layer holds.
        InvalidArgumentError (bad length, NaN/Inf keys, a range that is not
        whole layer groups), OutOfRangeError (region past the buffer),
        FailedPreconditionError (a range out of order), NotFoundError,
        ResourceExhaustedError (nothing stored)."""
        buffer_id, base = self._buffer_ref(buffer)
        region = types_pb2.BufferRegion(buffer_id=buffer_id, offset=base + offset, length=length)
        req = kv_pb2.AppendKvRequest(session_id=session_id, num_tokens=num_tokens, region=region)
        if num_layers:
            req.first_layer, req.num_layers = first_layer, num_layers
        return self._call(self._kv.AppendKv, req, "AppendKv").tokens

    def append_kv_layers(self, session_id: str, first_layer: int, keys: Any, values: Any, buffer: ShmBuffer, offset: int = 0) -> int:
        """Streaming prefill: appends one layer range of a chunk, ``keys`` and
        ``values`` [num_layers, kv_heads, n, head_dim] for layers
        [first_layer, first_layer + num_layers), as an engine produces them
        layer by layer. Ranges must be whole layer groups, in order from
        layer 0, all with the same n; the daemon indexes each range as it
        arrives and serves its layers before the rest is in. Returns the
        tokens every layer holds (unchanged until the last range lands)."""
        spec = self.session_spec(session_id)
        num_layers = int(getattr(keys, "shape", (0,))[0])
        sub = SessionSpec(num_layers, spec.kv_heads, spec.q_heads, spec.head_dim, spec.dtype)
        n = _check_kv(sub, session_id, keys, values)
        if offset < 0 or offset + sub.chunk_bytes(n) > buffer.size:
            raise InvalidArgumentError(
                f"layers {first_layer}..{first_layer + num_layers - 1} of {n} tokens need "
                f"{sub.chunk_bytes(n)} bytes at offset {offset}; shm buffer {buffer.buffer_id} has {buffer.size}"
            )
        write_kv_chunk(buffer, offset, sub, keys, values)
        return self.append_kv_region(session_id, buffer, offset, sub.chunk_bytes(n), n, first_layer, num_layers)

    def append_kv_inline(self, session_id: str, data: bytes, num_tokens: int) -> int:
        """Appends KV bytes carried in the request (bounded by the daemon's
        max_inline_bytes)."""
        req = kv_pb2.AppendKvRequest(session_id=session_id, num_tokens=num_tokens, inline_kv=bytes(data))
        return self._call(self._kv.AppendKv, req, "AppendKv").tokens

    def select_pages(self, session_id: str, layer: int, queries: Any, options: Optional[SelectOptions] = None) -> SelectResult:
        """Selects pages of one layer for its queries ([q_heads, head_dim];
        float32, float16 or bfloat16). One HeadSelection per KV head."""
        options = options or SelectOptions()
        req = kv_pb2.SelectPagesRequest(session_id=session_id, layer=layer)
        if not (options.reuse_group_selection and queries is None):
            req.queries, req.query_dtype = query_bytes(queries)
        _convert.select_params(options, req.params)
        req.reuse_group_selection = options.reuse_group_selection
        resp = self._call(self._kv.SelectPages, req, "SelectPages")
        out = SelectResult(_convert.head_selection(h) for h in resp.heads)
        out.reused = resp.reused
        return out

    def fetch_pages(
        self,
        session_id: str,
        layer: int,
        pages: Sequence[Union[HeadSelection, Sequence[int]]],
        buffer: Buffer,
        offset: int = 0,
        want_positions: bool = False,
        num_layers: int = 1,
        device: Optional[DeviceWrite] = None,
    ) -> FetchLayout:
        """Copies ``pages[h]`` of every KV head h (page ids, or the
        HeadSelections of select_pages) of layers [layer, layer+num_layers)
        into ``buffer`` at ``offset``. HeadSelections made at token
        granularity fetch their tokens (packed into slots). ``device``: block
        ids of a paged KV cache and CUDA IPC events (CUDA IPC buffers;
        DeviceWrite)."""
        buffer_id, base = self._buffer_ref(buffer)
        req = kv_pb2.FetchPagesRequest(
            session_id=session_id, layer=layer, buffer_id=buffer_id, offset=base + offset,
            want_positions=want_positions, num_layers=num_layers,
        )
        _convert.device_write(device, req)
        for h, p in enumerate(pages):
            if isinstance(p, HeadSelection) and len(p.pages) == 0 and len(p.positions) > 0:
                req.heads.add(kv_head=h, tokens=_ids(p.positions))
                continue
            ids = p.pages if isinstance(p, HeadSelection) else p
            req.heads.add(kv_head=h, pages=_ids(ids))
        return _convert.fetch_layout(self._call(self._kv.FetchPages, req, "FetchPages").layout, base)

    # -- decode ------------------------------------------------------------

    def fetch_tokens(
        self,
        session_id: str,
        layer: int,
        positions: Sequence[Sequence[int]],
        buffer: Buffer,
        offset: int = 0,
        want_positions: bool = False,
        num_layers: int = 1,
    ) -> FetchLayout:
        """Token granularity: copies the tokens at ``positions[h]`` of every KV
        head h, packed in order into slots of page_tokens rows (kv.proto
        HeadPages.tokens), into ``buffer`` at ``offset``."""
        buffer_id, base = self._buffer_ref(buffer)
        req = kv_pb2.FetchPagesRequest(
            session_id=session_id, layer=layer, buffer_id=buffer_id, offset=base + offset,
            want_positions=want_positions, num_layers=num_layers,
        )
        for h, pos in enumerate(positions):
            req.heads.add(kv_head=h, tokens=_ids(pos))
        return _convert.fetch_layout(self._call(self._kv.FetchPages, req, "FetchPages").layout, base)

    def decode_stream(self, session_id: str, buffer: Buffer) -> DecodeStream:
        """A new DecodeStream of the session into ``buffer`` (owned by the
        caller: close it, or use it as a context manager)."""
        return DecodeStream(self, session_id, buffer)

    def batch_decode_stream(self, buffer: Optional[Buffer] = None) -> BatchDecodeStream:
        """A stream for batched decode steps: each ``step(layer, entries)``
        carries one layer's queries for several sessions (BatchEntry) and
        answers each with its own result or error."""
        return BatchDecodeStream(self, buffer)

    def decode_step(
        self,
        session_id: str,
        layer: int,
        queries: Any,
        buffer: Buffer,
        offset: int = 0,
        options: Optional[SelectOptions] = None,
        num_layers: int = 1,
        device: Optional[DeviceWrite] = None,
        prefetch_group: bool = False,
        in_place: bool = False,
    ) -> StepResult:
        """One layer of a decode step over this client's stream of the session
        (opened on first use, reopened after an error), as in the C++ client.
        ``device``, ``prefetch_group`` and ``in_place``: see DecodeStream.step."""
        with self._lock:
            stream = self._streams.get(session_id)
            if stream is None:
                stream = self._streams[session_id] = DecodeStream(self, session_id, buffer)
        stream.set_buffer(buffer)
        return stream.step(layer, queries, offset=offset, options=options, num_layers=num_layers,
                           device=device, prefetch_group=prefetch_group, in_place=in_place)

    def close_decode_stream(self, session_id: str, raise_error: bool = True) -> None:
        """Closes the session's stream of decode_step (if open)."""
        with self._lock:
            stream = self._streams.pop(session_id, None)
        if stream is None:
            return
        try:
            stream.close()
        except Exception:
            if raise_error:
                raise

    # -- admin (PermissionDeniedError without the admin role) ---------------

    def get_stats(self) -> DaemonStats:
        return _convert.daemon_stats(self._call(self._admin.GetStats, admin_pb2.GetStatsRequest(), "GetStats"))

    def list_tenants(self) -> List[TenantInfo]:
        resp = self._call(self._admin.ListTenants, admin_pb2.ListTenantsRequest(), "ListTenants")
        return [_convert.tenant_info(t) for t in resp.tenants]

    def set_quota(self, tenant: str, quota_bytes: int) -> TenantInfo:
        req = admin_pb2.SetQuotaRequest(tenant=tenant, quota_bytes=quota_bytes)
        return _convert.tenant_info(self._call(self._admin.SetQuota, req, "SetQuota").tenant)

    def evict_session(self, session_id: str) -> None:
        self.close_decode_stream(session_id, raise_error=False)
        self._call(self._admin.EvictSession, admin_pb2.EvictSessionRequest(session_id=session_id), "EvictSession")

    def pin_session(self, session_id: str, pinned: bool = True) -> SessionInfo:
        req = admin_pb2.PinSessionRequest(session_id=session_id, pinned=pinned)
        return _convert.session_info(self._call(self._admin.PinSession, req, "PinSession").session)

    def drain(self, shutdown: bool = False) -> DrainInfo:
        resp = self._call(self._admin.Drain, admin_pb2.DrainRequest(shutdown=shutdown), "Drain")
        return DrainInfo(resp.in_flight, resp.sessions)

    def get_config(self, json: bool = False) -> str:
        """The daemon's effective config (secrets redacted), as protobuf text
        format or JSON."""
        cfg = self._call(self._admin.GetConfig, admin_pb2.GetConfigRequest(), "GetConfig").config
        if json:
            return json_format.MessageToJson(cfg, preserving_proto_field_name=True)
        return text_format.MessageToString(cfg)

    def health(self, service: str = "") -> bool:
        """grpc.health.v1 Check: True when SERVING, False when NOT_SERVING."""
        raw = service.encode()
        if len(raw) > 127:
            raise InvalidArgumentError("health service name longer than 127 bytes")
        # HealthCheckRequest { string service = 1; }, encoded by hand: Debian
        # ships no generated health stubs for Python either.
        request = b"\x0a" + bytes([len(raw)]) + raw if raw else b""
        resp = self._call(self._health, request, "Health")
        # HealthCheckResponse { ServingStatus status = 1; }: SERVING = 1.
        return len(resp) >= 2 and resp[0] == 0x08 and resp[1] == 1

    # -- lifetime ------------------------------------------------------------

    def close(self) -> None:
        """Closes the decode streams and the channel."""
        with self._lock:
            ids = list(self._streams)
        for sid in ids:
            self.close_decode_stream(sid, raise_error=False)
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_kv(spec: SessionSpec, session_id: str, keys: Any, values: Any) -> int:
    """Tokens in a keys/values pair; InvalidArgumentError naming what is off."""
    want = (spec.layers, spec.kv_heads, "n", spec.head_dim)
    for name, a in (("keys", keys), ("values", values)):
        shape = tuple(getattr(a, "shape", ()))
        if len(shape) != 4 or shape[0] != spec.layers or shape[1] != spec.kv_heads or shape[3] != spec.head_dim:
            raise InvalidArgumentError(
                f"{name} have shape {list(shape)}; session {session_id} wants "
                f"[layers={want[0]}, kv_heads={want[1]}, tokens, head_dim={want[3]}]"
            )
        dt = dtype_of(a) if _has_known_dtype(a) else None
        if dt != DType(spec.dtype):
            raise InvalidArgumentError(
                f"{name} are {getattr(a, 'dtype', type(a).__name__)}; session {session_id} stores "
                f"{DType(spec.dtype).name.lower()} (convert before appending)"
            )
    if tuple(keys.shape) != tuple(values.shape):
        raise InvalidArgumentError(
            f"keys {list(keys.shape)} and values {list(values.shape)} differ in shape"
        )
    if keys.shape[2] == 0:
        raise InvalidArgumentError(f"keys and values hold 0 tokens; append at least one")
    return int(keys.shape[2])


def _ids(ids: Any) -> List[int]:
    """Page ids or token positions as ints for a request: an integer numpy
    array (a step's positions) in one tolist(), anything else per element."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids.tolist()
    return [int(i) for i in ids]


def _has_known_dtype(a: Any) -> bool:
    try:
        dtype_of(a)
        return True
    except (InvalidArgumentError, AttributeError):
        return False


def kv_chunk_views(buffer: ShmBuffer, offset: int, spec: SessionSpec, tokens: int) -> Tuple[np.ndarray, np.ndarray]:
    """(keys, values) numpy views, each [layers, kv_heads, tokens, head_dim]
    of the session dtype (bfloat16 as int16), of an AppendKv chunk at
    ``offset``: fill them in place, then call append_kv_region with
    spec.chunk_bytes(tokens)."""
    shape = (spec.layers, spec.kv_heads, tokens, spec.head_dim)
    half = spec.chunk_bytes(tokens) // 2
    dtype = DType(spec.dtype)
    return buffer.view(offset, shape, dtype), buffer.view(offset + half, shape, dtype)


def write_kv_chunk(buffer: ShmBuffer, offset: int, spec: SessionSpec, keys: Any, values: Any) -> None:
    """Writes keys then values into the chunk at ``offset`` (one copy)."""
    k_view, v_view = kv_chunk_views(buffer, offset, spec, int(keys.shape[2]))
    for view, src in ((k_view, keys), (v_view, values)):
        if hasattr(src, "detach"):  # torch: copy from any device into the mapping
            import torch

            dst = torch.from_numpy(view)
            if src.dtype is torch.bfloat16:
                dst = dst.view(torch.bfloat16)
            dst.copy_(src.detach())
        else:
            view[...] = src
