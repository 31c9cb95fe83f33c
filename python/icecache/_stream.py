"""The two transports of a DecodeStream (one bidirectional gRPC call).

``SegregatedStream`` (used when this grpcio has it): the call runs on its
own completion queue, and the calling thread sends a request and plucks the
response itself, as the C++ client does: no thread hand-off per layer
message. It uses grpcio's internal ``cygrpc`` call API (the one grpcio's
own blocking unary calls use), checked at import; Debian 12's grpcio 1.51
has it.

``IteratorStream``: the public API (a request iterator fed through a queue,
consumed by grpcio's thread). Always available; each message costs two
thread wake-ups more, which on a loaded machine is several hundred
microseconds (python/README.md, "Overhead").

Both: ``exchange(request_bytes) -> response_bytes`` raises the daemon's
status as an IceCacheError once the call ended; ``close()`` half-closes and
returns the final status (None when OK).
"""

from __future__ import annotations

import os
import queue
from typing import Any, Optional, Tuple

import grpc

from .errors import IceCacheError, InternalError, error_class, from_rpc_error, status_code

try:  # grpcio internals: the same calls grpc/_channel.py makes for unary RPCs
    from grpc._cython import cygrpc as _cygrpc

    _HAVE_SEGREGATED = all(
        hasattr(_cygrpc, n)
        for n in (
            "SendInitialMetadataOperation",
            "ReceiveInitialMetadataOperation",
            "ReceiveStatusOnClientOperation",
            "SendMessageOperation",
            "ReceiveMessageOperation",
            "SendCloseFromClientOperation",
            "PropagationConstants",
        )
    )
except ImportError:  # pragma: no cover - every grpcio we know has it
    _cygrpc = None
    _HAVE_SEGREGATED = False

_EMPTY = 0
_METHOD = "/icecache.v1.KvService/DecodeStep"


def segregated_available(channel: grpc.Channel) -> bool:
    """True when the fast transport can run on this channel (and the
    environment does not ask for the public one with
    ICECACHE_DECODE_TRANSPORT=iterator)."""
    if os.environ.get("ICECACHE_DECODE_TRANSPORT", "") == "iterator":
        return False
    return _HAVE_SEGREGATED and hasattr(getattr(channel, "_channel", None), "segregated_call")


class SegregatedStream:
    def __init__(self, channel: grpc.Channel, metadata: Tuple[Tuple[str, str], ...]) -> None:
        c = _cygrpc
        ops = (
            ((c.SendInitialMetadataOperation(metadata, _EMPTY),), "init"),
            ((c.ReceiveInitialMetadataOperation(_EMPTY),), "initial_metadata"),
            ((c.ReceiveStatusOnClientOperation(_EMPTY),), "status"),
        )
        self._call = channel._channel.segregated_call(  # type: ignore[attr-defined]
            c.PropagationConstants.GRPC_PROPAGATE_DEFAULTS,
            _METHOD.encode(),
            None,
            None,
            metadata,
            None,
            ops,
            None,
        )
        self._status: Optional[IceCacheError] = None
        self._finished = False

    def _on_status(self, event: Any) -> None:
        op = event.batch_operations[0]
        self._finished = True
        code = status_code(op.code())
        if code is not grpc.StatusCode.OK:
            self._status = error_class(code)(op.details() or f"DecodeStep: {code.name.lower()}")

    def _wait(self, tags: set) -> Optional[bytes]:
        message = None
        while tags:
            event = self._call.next_event()
            if event.tag == "status":
                self._on_status(event)
            elif event.tag in tags:
                tags.discard(event.tag)
                if event.tag == "recv" and event.success:
                    message = event.batch_operations[0].message()
        return message

    def exchange(self, request: bytes) -> bytes:
        if self._finished:
            raise self._ended()
        c = _cygrpc
        tags = set()
        if self._call.operate((c.SendMessageOperation(request, _EMPTY),), "send"):
            tags.add("send")
        if self._call.operate((c.ReceiveMessageOperation(_EMPTY),), "recv"):
            tags.add("recv")
        message = self._wait(tags) if tags else None
        if message is None:
            while not self._finished:  # the call ended: its status says why
                self._on_next()
            raise self._ended()
        return message

    def _on_next(self) -> None:
        event = self._call.next_event()
        if event.tag == "status":
            self._on_status(event)

    def _ended(self) -> IceCacheError:
        return self._status or InternalError("decode stream closed by the daemon without a status")

    def close(self) -> Optional[IceCacheError]:
        if not self._finished:
            self._call.operate((_cygrpc.SendCloseFromClientOperation(_EMPTY),), "close")
            while not self._finished:
                self._on_next()
        return self._status

    def cancel(self) -> None:
        if not self._finished:
            self._call.cancel(_cygrpc.StatusCode.cancelled, "cancelled by the client")
            while not self._finished:
                self._on_next()


_CLOSE = object()


class _Requests:
    def __init__(self) -> None:
        self.queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()

    def __iter__(self) -> "_Requests":
        return self

    def __next__(self) -> bytes:
        item = self.queue.get()
        if item is _CLOSE:
            raise StopIteration
        return item


class IteratorStream:
    def __init__(self, channel: grpc.Channel, metadata: Tuple[Tuple[str, str], ...]) -> None:
        self._requests = _Requests()
        method = channel.stream_stream(_METHOD)  # bytes in, bytes out
        self._responses = method(self._requests, metadata=metadata)
        self._status: Optional[IceCacheError] = None
        self._finished = False

    def exchange(self, request: bytes) -> bytes:
        if self._finished:
            raise self._status or InternalError("decode stream closed by the daemon without a status")
        self._requests.queue.put(request)
        try:
            return next(self._responses)
        except grpc.RpcError as e:
            self._finished = True
            self._status = from_rpc_error(e, "DecodeStep")
            raise self._status from None
        except StopIteration:
            self._finished = True
            self._status = InternalError("decode stream closed by the daemon without a status")
            raise self._status from None

    def close(self) -> Optional[IceCacheError]:
        if not self._finished:
            self._finished = True
            self._requests.queue.put(_CLOSE)
            try:
                for _ in self._responses:
                    pass
            except grpc.RpcError as e:
                self._status = from_rpc_error(e, "DecodeStep")
        return self._status

    def cancel(self) -> None:
        if not self._finished:
            self._finished = True
            self._requests.queue.put(_CLOSE)
            self._responses.cancel()
