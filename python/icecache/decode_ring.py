"""The client's end of a DecodeStep ring (proto/icecache/v1/decode_ring.proto,
docs/architecture.md §8.1), as the C++ client's DecodeRingClient: a
registered shared-memory buffer holding a 256-byte header, the request area
and the response area, and two FIFOs under /dev/shm as doorbells. One
request is in flight at a time; an error answer ends only its own message.

Used by DecodeStream (``Client(decode_ring=True)``, the default); a daemon
that refuses the ring (an older one, a TCP connection) leaves the stream in
use.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Optional

import numpy as np

from .errors import InvalidArgumentError, UnavailableError, error_class, status_code
from .v1 import decode_ring_pb2

if TYPE_CHECKING:
    from .buffers import ShmBuffer
    from .client import Client

# common/decode_ring_layout.h
MAGIC = 0x47524349  # "ICRG"
VERSION = 1
HEADER_BYTES = 256
REQUEST_SEQ, REQUEST_LEN = 8, 16
RESPONSE_SEQ, CODE, RESPONSE_LEN = 64, 72, 76


class DecodeRing:
    """One session's ring. ``exchange`` sends a serialized DecodeStepRequest
    and returns the serialized answer, or raises the daemon's error."""

    CAPACITY = 4 << 20  # bytes of each area; untouched pages cost nothing

    def __init__(self, client: "Client", session_id: str) -> None:
        self._buf: Optional["ShmBuffer"] = None
        self._req_fd = self._resp_fd = -1
        self._seq = 0
        self.broken = False
        try:
            self._open(client, session_id)
        except BaseException:
            self.close()
            raise

    def _open(self, client: "Client", session_id: str) -> None:
        cap = self.CAPACITY
        self._buf = client.create_shm_buffer(HEADER_BYTES + 2 * cap)
        a = self._buf.array
        assert a is not None
        # Aligned 4- and 8-byte views: one store or load each, as the C++ side.
        self._u32 = a[:HEADER_BYTES].view(np.uint32)
        self._u64 = a[:HEADER_BYTES].view(np.uint64)
        self._i32 = a[:HEADER_BYTES].view(np.int32)
        self._u32[0], self._u32[1] = MAGIC, VERSION
        self._request = a[HEADER_BYTES:HEADER_BYTES + cap]
        self._response = a[HEADER_BYTES + cap:HEADER_BYTES + 2 * cap]
        stem = f"/dev/shm/icecache-ring-{os.getpid()}-{secrets.token_hex(8)}"
        names = [stem + ".req", stem + ".resp"]
        made = []
        try:
            for n in names:
                os.mkfifo(n, 0o600)
                made.append(n)
            # Read-write: this process stays the request FIFO's writer, so the
            # daemon sees end of file only when it closes it or exits.
            self._req_fd = os.open(names[0], os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
            self._resp_fd = os.open(names[1], os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            os.write(self._req_fd, b"\x01")  # hello
            req = decode_ring_pb2.OpenDecodeRingRequest(
                session_id=session_id, buffer_id=self._buf.buffer_id, request_capacity=cap,
                response_capacity=cap, request_fifo=names[0], response_fifo=names[1])
            resp = client._call(client._rings.OpenDecodeRing, req, "OpenDecodeRing")
            self.ring_id = resp.ring_id
            # The daemon holds the write end now: a blocking read ends at its
            # answer, or at end of file when it closes the ring.
            os.set_blocking(self._resp_fd, True)
        finally:
            for n in made:
                os.unlink(n)

    def fits(self, request_bytes: int) -> bool:
        return request_bytes <= self.CAPACITY

    def exchange(self, request: bytes) -> bytes:
        if self.broken:
            raise UnavailableError("the daemon closed this decode ring")
        n = len(request)
        if n > self.CAPACITY:
            raise InvalidArgumentError(f"a DecodeStep request of {n} bytes does not fit the "
                                       f"ring's {self.CAPACITY}-byte request area")
        self._request[:n] = np.frombuffer(request, dtype=np.uint8)
        self._u32[REQUEST_LEN // 4] = n
        self._seq += 1
        seq = self._seq
        self._u64[REQUEST_SEQ // 8] = seq  # last: the daemon reads the rest after it
        try:
            os.write(self._req_fd, b"\x01")
        except BlockingIOError:
            pass  # unread bells: the daemon reads request_seq anyway
        while int(self._u64[RESPONSE_SEQ // 8]) != seq:
            try:
                bells = os.read(self._resp_fd, 64)
            except InterruptedError:
                continue
            if not bells and int(self._u64[RESPONSE_SEQ // 8]) != seq:
                self.broken = True
                raise UnavailableError(
                    "the daemon closed the decode ring (it stopped or reclaimed the ring)")
        code = int(self._i32[CODE // 4])
        size = int(self._u32[RESPONSE_LEN // 4])
        if size > self.CAPACITY:
            raise UnavailableError("decode ring: response_len past the response area")
        body = self._response[:size].tobytes()
        if code != 0:
            raise error_class(status_code(code))(body.decode("utf-8", "replace"))
        return body

    def close(self) -> None:
        """Closes the doorbells (the daemon then reclaims the ring) and the
        buffer."""
        for fd in (self._req_fd, self._resp_fd):
            if fd >= 0:
                os.close(fd)
        self._req_fd = self._resp_fd = -1
        if self._buf is not None:
            buf, self._buf = self._buf, None
            self._request = self._response = None  # type: ignore[assignment]
            self._u32 = self._u64 = self._i32 = None  # type: ignore[assignment]
            buf.close()
