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

import threading
from typing import TYPE_CHECKING, Any, Optional, Union

from . import _convert
from ._stream import IteratorStream, SegregatedStream, segregated_available
from .errors import IceCacheError
from .queries import query_bytes
from .types import SelectOptions, StepResult
from .v1 import kv_pb2

if TYPE_CHECKING:  # pragma: no cover
    from .buffers import CudaBuffer, ShmBuffer
    from .client import Client

__all__ = ["DecodeStream"]


class DecodeStream:
    """The decode stream of one session into one buffer.

    Usually made by ``Client.decode_stream(session_id, buffer)``; use it as a
    context manager or call ``close()``. ``transport`` is "segregated"
    (the fast one, when this grpcio has it) or "iterator" (public API).
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

    def step(
        self,
        layer: int,
        queries: Any,
        *,
        offset: int = 0,
        options: Optional[SelectOptions] = None,
        num_layers: int = 1,
    ) -> StepResult:
        """One layer: ``queries`` is [q_heads, head_dim] (numpy or torch;
        float32, float16 or bfloat16). Pages of layers [layer, layer +
        num_layers) land in the buffer at ``offset`` before this returns.
        With options.reuse_group_selection, ``queries`` may be None."""
        options = options or SelectOptions()
        req = kv_pb2.DecodeStepRequest(layer=layer, offset=self._base + offset, num_layers=num_layers)
        if queries is not None or not options.reuse_group_selection:
            req.queries, req.query_dtype = query_bytes(queries, "queries")
        _convert.select_params(options, req.params)
        req.reuse_group_selection = options.reuse_group_selection
        with self._lock:
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
        return StepResult(resp.layer, reused=resp.reused, raw=resp)

    def set_buffer(self, buffer: "Union[ShmBuffer, CudaBuffer, str]") -> None:
        """Later steps write into ``buffer`` (sent with the next request)."""
        with self._lock:
            self._buffer_id, self._base = self._client._buffer_ref(buffer)

    def close(self) -> None:
        """Half-closes the stream and waits for the daemon's final status;
        raises it when it is an error."""
        with self._lock:
            stream, self._stream = self._stream, None
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
