"""Daemon: a real icecached started as a child process on a private socket.

For tests, examples and benchmarks (the Python twin of the C++
``DaemonProcess``): it writes a config file (the caller's textproto merged
with a private Unix socket, metrics off and, by default, the caller's uid as
admin), starts the binary, waits for its "icecached ready" line and a
working socket, and stops it with SIGTERM (then SIGKILL) on ``stop()``.

The binary: the ``binary`` argument, else ``$ICECACHE_ICECACHED``, else
``icecached`` on PATH.

Not thread-safe; the daemon itself is of course used concurrently through
its socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket as socketlib
import subprocess
import tempfile
import time
from typing import List, Optional

from google.protobuf import text_format

from .errors import DeadlineExceededError, NotFoundError, UnavailableError
from .v1 import config_pb2

__all__ = ["Daemon", "find_icecached"]


def find_icecached(binary: Optional[str] = None) -> str:
    """The icecached executable (see module docstring); NotFoundError with
    what was tried."""
    candidates = [binary, os.environ.get("ICECACHE_ICECACHED"), shutil.which("icecached")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise NotFoundError(
        "icecached not found: pass binary=..., set ICECACHE_ICECACHED to the built "
        "binary (build/server/icecached) or put icecached on PATH"
    )


class Daemon:
    """A running icecached on a private socket; a context manager.

    Args:
        binary: path of icecached (see find_icecached).
        config: extra IcecachedConfig textproto (e.g. 'pool { capacity_bytes:
            1073741824 }'); listen.unix_socket and metrics.port are set here.
        admin: True: this process's uid has the admin role (added to
            auth.admin_uids); False: no Unix-socket admin at all.
        log_level: daemon log level flag.
        ready_timeout: seconds to wait for readiness.
    """

    def __init__(
        self,
        binary: Optional[str] = None,
        config: str = "",
        admin: bool = True,
        log_level: str = "warn",
        extra_args: Optional[List[str]] = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.binary = find_icecached(binary)
        self.temp_dir = tempfile.mkdtemp(prefix="icecached-py-")
        os.chmod(self.temp_dir, 0o755)
        self.socket_path = os.path.join(self.temp_dir, "icecached.sock")
        self.config_path = os.path.join(self.temp_dir, "icecached.textproto")
        self.stderr_path = os.path.join(self.temp_dir, "stderr.log")
        cfg = config_pb2.IcecachedConfig()
        text_format.Merge(config, cfg)
        cfg.listen.unix_socket = self.socket_path
        cfg.metrics.port = 0
        if admin and os.getuid() not in cfg.auth.admin_uids:
            cfg.auth.admin_uids.append(os.getuid())
        elif not admin and not cfg.auth.admin_uids and "no_unix_admins" in cfg.auth.DESCRIPTOR.fields_by_name:
            cfg.auth.no_unix_admins = True  # else the daemon's own uid and root are admins
        with open(self.config_path, "w") as f:
            f.write(text_format.MessageToString(cfg))
        args = [self.binary, f"--config={self.config_path}", f"--log-level={log_level}"]
        args += extra_args or []
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def target(self) -> str:
        return "unix:" + self.socket_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UnavailableError(
                    f"icecached exited with status {self.process.returncode} before it was "
                    f"ready; its stderr:\n{self.stderr()[-2000:]}"
                )
            if "icecached ready" in self.stderr() and _can_connect(self.socket_path):
                return
            time.sleep(0.02)
        raise DeadlineExceededError(
            f"icecached not ready on {self.socket_path} after {timeout} s; its stderr:\n"
            f"{self.stderr()[-2000:]}"
        )

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait ``timeout`` s, then SIGKILL; removes the temp dir.
        Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _can_connect(path: str) -> bool:
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
