"""DecodeStream: one session's bidirectional DecodeStep stream.

Each ``step()`` writes one request (one layer's queries) and waits for its
response: the daemon has then selected the layer's pages for every KV head
and written them into the buffer. The first request names the session and
the buffer; later ones leave them empty unless the buffer changes. When the
daemon ends the stream with an error, ``step()`` raises it (the class of its
status code, the daemon's message) and the next ``step()`` opens a fresh
stream, as the C++ client does. Transports: icecache._stream.

Thread safety: one step at a time per stream (a lock serialises them);
streams of different sessions are independent.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Optional, Union

from . import _convert
from ._stream import IteratorStream, SegregatedStream, segregated_available
from .decode_ring import DecodeRing
from .errors import IceCacheError, InternalError
from .queries import query_bytes
from .types import DeviceWrite, SelectOptions, StepResult
from .v1 import kv_pb2

if TYPE_CHECKING:  # pragma: no cover
    from .buffers import CudaBuffer, ShmBuffer
    from .client import Client

__all__ = ["DecodeStream"]


class DecodeStream:
    """The decode stream of one session into one buffer.

    Usually made by ``Client.decode_stream(session_id, buffer)``; use it as a
    context manager or call ``close()``. ``transport`` is "segregated"
    (the fast one, when this grpcio has it) or "iterator" (public API), or
    "ring" once a shared-memory ring carries the steps (``Client(
    decode_ring=True)``, the default, and the daemon accepted it at the
    first step; else the stream is used, and ``ring_refused`` says why).
    ICECACHE_DECODE_TRANSPORT=segregated or iterator keeps to that stream,
    =ring asks for the ring whatever the client says. On the ring an error
    ends only its own step.
    """

    def __init__(
        self,
        client: "Client",
        session_id: str,
        buffer: "Union[ShmBuffer, CudaBuffer, str]",
    ) -> None:
        self._client = client
        self.session_id = session_id
        self._buffer_id, self._base = client._buffer_ref(buffer)
        self._lock = threading.Lock()
        self._stream: Optional[Union[SegregatedStream, IteratorStream]] = None
        self._sent_buffer = ""
        fast = segregated_available(client._channel)
        self.transport = "segregated" if fast else "iterator"
        self._factory = SegregatedStream if fast else IteratorStream
        self._ring: Optional[DecodeRing] = None
        self._ring_sent_buffer = ""
        env = os.environ.get("ICECACHE_DECODE_TRANSPORT", "")
        self._want_ring = env == "ring" or (client.decode_ring and env not in ("segregated", "iterator"))
        # Why the ring is not in use after it was asked for (the daemon's refusal).
        self.ring_refused: Optional[IceCacheError] = None

    def step(
        self,
        layer: int,
        queries: Any,
        *,
        offset: int = 0,
        options: Optional[SelectOptions] = None,
        num_layers: int = 1,
        device: Optional[DeviceWrite] = None,
        prefetch_group: bool = False,
        in_place: bool = False,
    ) -> StepResult:
        """One layer: ``queries`` is [q_heads, head_dim] (numpy or torch;
        float32, float16 or bfloat16). Pages of layers [layer, layer +
        num_layers) land in the buffer at ``offset`` before this returns.
        With options.reuse_group_selection, ``queries`` may be None.

        ``device`` (CUDA IPC buffers): block ids of the registered paged KV
        cache and CUDA IPC events (DeviceWrite; with a done event the step
        returns once the push is enqueued). ``prefetch_group`` on the first
        layer of a layer group (IceCache(r)): the daemon then writes the
        group's later layers in the background, layer ``layer + j`` at
        ``offset + j * layout.layer_stride_bytes`` (or into the same block
        ids), and the step for such a layer (reuse_group_selection, that
        offset) only waits for its write (``StepResult.prefetched``);
        ``StepResult.prefetching`` says how many layers were started.

        ``in_place`` (token granularity into a ShmBuffer): the region at
        ``offset`` still holds what this session's previous step of the same
        layers wrote there, untouched since (keep a region per layer). The
        daemon then copies only the rows of newly selected tokens, into the
        slots of the tokens that left; the layout's positions give each
        slot's token and ``layout.rows_copied`` / ``rows_kept`` the split.
        Without such a previous write the step writes in full."""
        options = options or SelectOptions()
        req = kv_pb2.DecodeStepRequest(layer=layer, offset=self._base + offset, num_layers=num_layers,
                                       prefetch_group=prefetch_group, in_place=in_place,
                                       positions_as_bytes=True)
        _convert.device_write(device, req)
        if queries is not None or not options.reuse_group_selection:
            req.queries, req.query_dtype = query_bytes(queries, "queries")
        _convert.select_params(options, req.params)
        req.reuse_group_selection = options.reuse_group_selection
        with self._lock:
            raw = self._ring_step(req)
            if raw is not None:
                resp = kv_pb2.DecodeStepResponse.FromString(raw)
                return StepResult(resp.layer, reused=resp.reused, raw=resp, base=self._base)
            if self._stream is None:
                self._stream = self._factory(self._client._channel, self._client._metadata)
                self._sent_buffer = ""
            if self._sent_buffer != self._buffer_id:
                req.session_id = self.session_id
                req.buffer_id = self._buffer_id
            try:
                raw = self._stream.exchange(req.SerializeToString())
            except IceCacheError:
                self._stream = None  # the next step opens a fresh stream
                raise
            self._sent_buffer = self._buffer_id
        resp = kv_pb2.DecodeStepResponse.FromString(raw)
        return StepResult(resp.layer, reused=resp.reused, raw=resp, base=self._base)

    def _ring_step(self, req: "kv_pb2.DecodeStepRequest") -> Optional[bytes]:
        """The answer over the ring, or None where the stream is to carry the
        step (no ring asked for, refused, closed by the daemon, or a request
        too large for it). Under self._lock."""
        if not self._want_ring:
            return None
        if self._ring is None:
            try:
                self._ring = DecodeRing(self._client, self.session_id)
            except IceCacheError as e:
                self._want_ring = False  # this daemon or connection has no ring for us
                self.ring_refused = e
                return None
            except OSError as e:  # no FIFO or shm file here (/dev/shm missing or full)
                self._want_ring = False
                self.ring_refused = InternalError(f"decode ring: {e}")
                return None
            self.transport = "ring"
            self._ring_sent_buffer = ""
        if self._ring_sent_buffer != self._buffer_id:
            req.buffer_id = self._buffer_id  # carries over on the ring from here
        data = req.SerializeToString()
        req.ClearField("buffer_id")
        if not self._ring.fits(len(data)):
            return None
        try:
            raw = self._ring.exchange(data)
        except IceCacheError:
            if self._ring.broken:  # the daemon closed it: the stream from here
                self._close_ring()
                self._want_ring = False
                self.transport = "segregated" if self._factory is SegregatedStream else "iterator"
            raise
        self._ring_sent_buffer = self._buffer_id
        return raw

    def _close_ring(self) -> None:
        if self._ring is not None:
            ring, self._ring = self._ring, None
            ring.close()

    def set_buffer(self, buffer: "Union[ShmBuffer, CudaBuffer, str]") -> None:
        """Later steps write into ``buffer`` (sent with the next request)."""
        with self._lock:
            self._buffer_id, self._base = self._client._buffer_ref(buffer)

    def close(self) -> None:
        """Half-closes the stream and waits for the daemon's final status;
        raises it when it is an error."""
        with self._lock:
            stream, self._stream = self._stream, None
            self._close_ring()
        if stream is not None:
            status = stream.close()
            if status is not None:
                raise status

    def cancel(self) -> None:
        """Cancels the call now (the daemon sees CANCELLED)."""
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    def __enter__(self) -> "DecodeStream":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        try:
            self.close()
        except IceCacheError:
            if exc_type is None:
                raise

    def __del__(self) -> None:
        try:
            if self._stream is not None:
                self._stream.cancel()
        except Exception:
            pass


class BatchEntry:
    """One session of a batched decode step: its queries ([q_heads,
    head_dim]; None with reuse_group_selection), the buffer its pages go to
    (None = the stream's) and the offset there; ``prefetch_group`` as in
    DecodeStream.step, and ``in_place`` likewise."""

    __slots__ = ("session_id", "queries", "buffer", "offset", "reuse_group_selection", "prefetch_group",
                 "in_place")

    def __init__(self, session_id: str, queries: Any, buffer: Any = None, offset: int = 0,
                 reuse_group_selection: bool = False, prefetch_group: bool = False,
                 in_place: bool = False) -> None:
        self.session_id = session_id
        self.queries = queries
        self.buffer = buffer
        self.offset = offset
        self.reuse_group_selection = reuse_group_selection
        self.prefetch_group = prefetch_group
        self.in_place = in_place


class BatchResult:
    """One entry's answer: ``result`` (a StepResult) when ``error`` is None,
    else ``error``, the IceCacheError of the entry's own status code with the
    daemon's message (a bad entry fails alone; nothing is written for it)."""

    __slots__ = ("session_id", "error", "result")

    def __init__(self, session_id: str, error: Optional[IceCacheError], result: Optional[StepResult]) -> None:
        self.session_id = session_id
        self.error = error
        self.result = result


class BatchDecodeStream:
    """A DecodeStep stream whose requests carry one layer's queries for
    several sessions of the caller's tenant (the daemon runs the entries in
    parallel and answers each with its own status). Made by
    ``Client.batch_decode_stream(buffer)``; ``buffer`` is the default for
    entries that name none. All entries of a step share the query dtype of
    the first entry."""

    def __init__(self, client: "Client", buffer: "Union[ShmBuffer, CudaBuffer, str, None]" = None) -> None:
        self._client = client
        self._default = client._buffer_ref(buffer) if buffer is not None else ("", 0)
        self._lock = threading.Lock()
        self._stream: Optional[Union[SegregatedStream, IteratorStream]] = None
        fast = segregated_available(client._channel)
        self.transport = "segregated" if fast else "iterator"
        self._factory = SegregatedStream if fast else IteratorStream

    def step(self, layer: int, entries: "list[BatchEntry]", *, options: Optional[SelectOptions] = None,
             num_layers: int = 1) -> "list[BatchResult]":
        """One layer for every entry; results in entry order."""
        from .errors import error_class, InvalidArgumentError, status_code

        if not entries:
            raise InvalidArgumentError("a batched decode step needs at least one entry")
        options = options or SelectOptions()
        req = kv_pb2.DecodeStepRequest(layer=layer, num_layers=num_layers, positions_as_bytes=True)
        _convert.select_params(options, req.params)
        dtype = None
        bases = []
        for e in entries:
            buffer_id, base = self._client._buffer_ref(e.buffer) if e.buffer is not None else self._default
            bases.append(base)
            entry = req.batch.add(session_id=e.session_id, buffer_id=buffer_id, offset=base + e.offset,
                                  reuse_group_selection=e.reuse_group_selection,
                                  prefetch_group=e.prefetch_group, in_place=e.in_place)
            if e.queries is not None:
                entry.queries, qd = query_bytes(e.queries, f"queries of session {e.session_id}")
                dtype = qd if dtype is None else dtype
        if dtype is not None:
            req.query_dtype = dtype
        with self._lock:
            if self._stream is None:
                self._stream = self._factory(self._client._channel, self._client._metadata)
            try:
                raw = self._stream.exchange(req.SerializeToString())
            except IceCacheError:
                self._stream = None
                raise
        resp = kv_pb2.DecodeStepResponse.FromString(raw)
        out = []
        for i, r in enumerate(resp.batch):
            if r.code == 0:
                base = bases[i] if i < len(bases) else 0
                out.append(BatchResult(r.session_id, None,
                                       StepResult(resp.layer, reused=r.reused, raw=r, base=base)))
            else:
                cls = error_class(status_code(r.code))
                out.append(BatchResult(r.session_id, cls(r.message), None))
        return out

    def close(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            status = stream.close()
            if status is not None:
                raise status

    def __enter__(self) -> "BatchDecodeStream":
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        try:
            self.close()
        except IceCacheError:
            if exc_type is None:
                raise
