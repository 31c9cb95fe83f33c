"""Buffers the daemon writes fetched pages into (and reads appended KV from).

``ShmBuffer``: a file under /dev/shm that this process creates (mode 0600,
O_EXCL, O_NOFOLLOW), sizes, maps and registers; numpy (and torch) views of
its regions read and write it in place. Closing it unregisters it (best
effort), unmaps and unlinks the file. The file name,
``/dev/shm/icecache-<pid>-<random>``, is the C++ client's, so
``reclaim_orphaned_shm()`` can remove the files of clients (Python or C++)
that died holding one; the daemon itself drops a buffer nobody used for its
``sessions.buffer_idle_ttl_ms``.

``CudaBuffer``: a torch CUDA tensor registered by CUDA IPC, so fetched pages
land in GPU memory. It needs torch with a CUDA device; anywhere else it
raises FailedPreconditionError saying so.

Thread safety: reading and writing the views concurrently is the caller's
business; close() must not race with other calls on the same buffer.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import secrets
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
)
from .types import DType

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client

__all__ = ["ShmBuffer", "CudaBuffer", "reclaim_orphaned_shm", "SHM_DIR"]

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^icecache-(\d+)-[0-9a-f]+$")

Shape = Union[int, Sequence[int]]


def _storage_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, (DType, str)) or "torch" in str(type(dtype)):
        try:
            return DType.of(dtype).numpy_storage
        except InvalidArgumentError:
            pass
    return np.dtype(dtype)


class ShmBuffer:
    """A registered region of shared memory under /dev/shm.

    Create it with ``Client.create_shm_buffer(size)``; use it as a context
    manager (or call ``close()``). Attributes: ``path``, ``size``,
    ``buffer_id`` (the daemon's id), ``array`` (a uint8 numpy view of the
    whole buffer).

    Views returned by ``view()`` / ``tensor()`` share the mapping. close()
    unmaps only when no view is alive; otherwise the mapping is released
    when the last view is garbage collected (the file is unlinked and the
    buffer unregistered either way).
    """

    def __init__(self, client: "Client", size: int) -> None:
        if not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"shm buffer size must be a positive int, got {size!r}")
        self._client: Optional["Client"] = None
        self.buffer_id = ""
        self.size = size
        self.path = f"{SHM_DIR}/icecache-{os.getpid()}-{secrets.token_hex(8)}"
        self._mmap: Optional[mmap.mmap] = None
        self.array: Optional[np.ndarray] = None
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise InternalError(f"cannot create shm file under {SHM_DIR}: {e.strerror}") from e
        try:
            os.ftruncate(fd, size)
            # The memory is taken now, not at the first write: a full /dev/shm
            # fails here instead of with a SIGBUS in the middle of a copy, and
            # the first prefill chunk pays no page allocation per 4 KiB.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    os.close(fd)
                    self._unlink()
                    raise ResourceExhaustedError(
                        f"{SHM_DIR} has no room for a buffer of {size} bytes: free space there "
                        f"(df -h {SHM_DIR}), or use smaller buffers") from e
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            self._unlink()
            raise InternalError(f"cannot size or map {self.path} ({size} bytes): {e.strerror}") from e
        os.close(fd)  # the mapping keeps the memory; the daemon opens the path itself
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        # A zero (what the file holds) into every 4 KiB page: on a virtual
        # machine that backs guest memory lazily, a mapped page can still
        # cost ~5 us at its first touch, which a pinned buffer pays when it
        # is made (docs/bench/touch49.md).
        self.array[::4096] = 0
        try:
            self.buffer_id = client.register_shm(self.path, size)
        except BaseException:
            self.close()
            raise
        self._client = client

    # -- views --------------------------------------------------------------

    def _check_region(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise OutOfRangeError(
                f"region [{offset}, {offset + nbytes}) is past the shm buffer "
                f"{self.buffer_id or self.path} of {self.size} bytes"
            )

    def view(self, offset: int, shape: Shape, dtype: Any = np.uint8) -> np.ndarray:
        """A numpy view of ``shape`` elements of ``dtype`` at byte ``offset``
        (bfloat16 is returned as its int16 storage; use ``tensor()``)."""
        if self.array is None:
            raise FailedPreconditionError(f"shm buffer {self.path} is closed")
        np_dtype = _storage_dtype(dtype)
        shape_t: Tuple[int, ...] = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shape_t, dtype=np.int64))
        self._check_region(offset, count * np_dtype.itemsize)
        if offset % np_dtype.itemsize:
            raise InvalidArgumentError(
                f"offset {offset} is not aligned to {np_dtype.itemsize} bytes ({np_dtype})"
            )
        flat = self.array[offset : offset + count * np_dtype.itemsize].view(np_dtype)
        return flat.reshape(shape_t)

    def tensor(self, offset: int, shape: Shape, dtype: Any) -> Any:
        """A CPU torch tensor viewing the region (float16, bfloat16, float32
        or any torch dtype numpy can hold)."""
        import torch

        if dtype is torch.bfloat16:
            return torch.from_numpy(self.view(offset, shape, np.int16)).view(torch.bfloat16)
        return torch.from_numpy(self.view(offset, shape, dtype))

    # -- lifecycle ----------------------------------------------------------

    @property
    def registered(self) -> bool:
        return self._client is not None

    def unregister(self) -> None:
        """Unregisters now and raises the daemon's error if any (close() does
        the same silently). The mapping and file stay until close()."""
        if self._client is None:
            raise FailedPreconditionError(f"shm buffer {self.path} is not registered")
        client, self._client = self._client, None
        client.unregister_buffer(self.buffer_id)

    def close(self) -> None:
        """Unregisters (best effort), unmaps when no view is alive, unlinks."""
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.unregister_buffer(self.buffer_id)
            except Exception:  # best effort: the daemon may be gone already
                pass
        self.array = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views alive: the mapping goes with the last of them
            self._mmap = None
        self._unlink()

    def _unlink(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "ShmBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ShmBuffer(id={self.buffer_id!r}, path={self.path!r}, size={self.size})"


def reclaim_orphaned_shm(directory: str = SHM_DIR) -> list[str]:
    """Unlinks ``icecache-<pid>-*`` files of this uid whose process is gone
    (clients that died holding a buffer). Returns the paths removed."""
    removed = []
    uid = os.getuid()
    for name in os.listdir(directory):
        m = _NAME_RE.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != uid or _pid_alive(int(m.group(1))):
            continue
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CudaBuffer:
    """A torch CUDA tensor registered with the daemon by CUDA IPC.

    ``CudaBuffer(client, tensor)``: ``tensor`` must be a contiguous CUDA
    tensor; pages are written into its bytes. Offsets given to FetchPages /
    DecodeStep through this object are relative to the tensor's first byte;
    ``base_offset`` translates them to the IPC allocation the daemon maps.
    With ``paged_kv`` (a PagedKvCache whose offsets count from the
    tensor's first byte, like every other offset given through this object)
    the tensor is an engine's paged KV cache: its offsets are moved by
    ``base_offset`` before registering, so a tensor carved from the middle of
    the caching allocator's block is registered where it lies.

    Raises FailedPreconditionError where torch has no CUDA device (and the
    daemon's FailedPreconditionError when it was built without CUDA),
    InvalidArgumentError for a CPU or non-contiguous tensor.
    """

    def __init__(self, client: "Client", tensor: Any, paged_kv: Any = None) -> None:
        torch = _cuda_torch()
        if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
            where = getattr(tensor, "device", type(tensor).__name__)
            raise InvalidArgumentError(f"CudaBuffer needs a CUDA tensor; got one on {where}")
        if not tensor.is_contiguous():
            raise InvalidArgumentError("CudaBuffer needs a contiguous tensor")
        self.tensor = tensor
        self.size = tensor.numel() * tensor.element_size()
        # torch >= 2 names the byte storage untyped_storage(); storage() there
        # is the deprecated TypedStorage (same _share_cuda_, byte offsets).
        storage = tensor.untyped_storage() if hasattr(tensor, "untyped_storage") else tensor.storage()
        share = storage._share_cuda_()
        handle, storage_offset = ipc_mem_handle(bytes(share[1])), share[3]
        self.base_offset = storage_offset + tensor.storage_offset() * tensor.element_size()
        self.device_uuid = _device_uuid(tensor.device.index)
        self._client: Optional["Client"] = client
        if paged_kv is not None:
            paged_kv = dataclasses.replace(
                paged_kv,
                base_offset_bytes=paged_kv.base_offset_bytes + self.base_offset,
                layer_offsets_bytes=[o + self.base_offset for o in paged_kv.layer_offsets_bytes],
            )
        self.buffer_id = client.register_cuda_ipc(
            handle, self.base_offset + self.size, self.device_uuid, paged_kv=paged_kv
        )

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.unregister_buffer(self.buffer_id)
            except Exception:
                pass

    def __enter__(self) -> "CudaBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ipc_mem_handle(shared: bytes) -> bytes:
    """The cudaIpcMemHandle_t (64 bytes) in what torch's
    ``UntypedStorage._share_cuda_()`` returns as the handle: the bare 64
    bytes (torch 1.x), or a version byte (2), a kind byte ('c': a cudaMalloc
    block) and the 64 bytes (torch 2.x's caching allocator)."""
    if len(shared) == 64:
        return shared
    if len(shared) == 66 and shared[0] == 2 and shared[1:2] == b"c":
        return shared[2:]
    if len(shared) >= 2 and shared[0] == 2 and shared[1:2] == b"e":
        raise FailedPreconditionError(
            "the tensor lives in an expandable segment of torch's caching allocator "
            "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), which has no "
            "cudaIpcMemHandle_t; allocate the KV cache without expandable segments"
        )
    raise InvalidArgumentError(
        f"torch shared this tensor with a CUDA IPC handle of {len(shared)} bytes in a form "
        f"this client does not know (first bytes {shared[:2]!r}); expected a 64-byte "
        "cudaIpcMemHandle_t, bare or after torch 2's version and kind bytes"
    )


def _cuda_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise FailedPreconditionError("CudaBuffer needs torch with CUDA; torch is not installed") from e
    if not torch.cuda.is_available():
        raise FailedPreconditionError(
            "CudaBuffer needs a CUDA device, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "use Client.create_shm_buffer() on CPU-only machines"
        )
    return torch


def _device_uuid(index: int) -> bytes:
    """16 raw bytes from torch when it knows them, else the "GPU-..." text
    form from nvidia-smi (the daemon accepts both)."""
    import subprocess

    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        return bytes(uuid.bytes) if hasattr(uuid, "bytes") else str(uuid).encode()
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader", "-i", str(index)],
        capture_output=True,
        text=True,
        check=False,
    )
    text = out.stdout.strip()
    if out.returncode != 0 or not text.startswith("GPU-"):
        raise FailedPreconditionError(
            f"cannot find the UUID of CUDA device {index}: this torch has no "
            f"device_properties.uuid and nvidia-smi said: {out.stderr.strip() or text}"
        )
    return text.encode()
