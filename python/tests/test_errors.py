"""Every gRPC status code maps to its exception, with the daemon's message."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from concurrent import futures

import grpc
import numpy as np
import pytest
from conftest import small_spec

import icecache
from icecache import errors

ALL_CODES = [c for c in grpc.StatusCode if c is not grpc.StatusCode.OK]


def test_every_code_has_its_own_class():
    classes = {errors.error_class(c) for c in ALL_CODES}
    assert len(classes) == len(ALL_CODES) == 16
    for c in ALL_CODES:
        cls = errors.error_class(c)
        assert cls.code is c
        assert issubclass(cls, icecache.IceCacheError)
        assert cls.__name__ in icecache.__all__


class _AbortWith(grpc.GenericRpcHandler):
    """A real gRPC server whose one method answers the code named in the
    request with a message naming it (codes the daemon never answers, like
    DATA_LOSS, still travel the real transport)."""

    def service(self, details):
        def handler(request, context):
            code = grpc.StatusCode[request.decode()]
            context.abort(code, f"daemon says {code.name}")

        return grpc.unary_unary_rpc_method_handler(handler)


@pytest.fixture(scope="module")
def abort_server():
    d = tempfile.mkdtemp(prefix="icecache-abort-")
    path = os.path.join(d, "s.sock")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((_AbortWith(),))
    server.add_insecure_port("unix:" + path)
    server.start()
    yield path
    server.stop(None)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("code", ALL_CODES, ids=lambda c: c.name)
def test_status_code_travels_to_its_exception(abort_server, code):
    with grpc.insecure_channel("unix:" + abort_server) as ch:
        call = ch.unary_unary("/test.Abort/Abort")
        with pytest.raises(grpc.RpcError) as info:
            call(code.name.encode(), timeout=10)
    err = errors.from_rpc_error(info.value)
    assert type(err) is errors.error_class(code)
    assert err.code is code
    assert err.message == f"daemon says {code.name}"


# -- codes the daemon itself answers ------------------------------------------------


def test_invalid_argument_names_the_field(client):
    with pytest.raises(icecache.InvalidArgumentError) as e:
        client.create_session(small_spec(layers=0))
    assert "layers" in e.value.message


def test_not_found_for_unknown_session(client):
    with pytest.raises(icecache.NotFoundError) as e:
        client.get_session("no-such-session")
    assert "no-such-session" in e.value.message
    assert isinstance(e.value, LookupError)


def test_failed_precondition_select_on_empty_session(client):
    s = client.create_session(small_spec())
    try:
        with pytest.raises(icecache.FailedPreconditionError):
            client.select_pages(s.id, 0, np.ones((4, 32), np.float32))
    finally:
        client.drop_session(s.id)


def test_out_of_range_region_past_the_buffer(client):
    s = client.create_session(small_spec())
    try:
        with client.create_shm_buffer(4096) as buf:
            n = 16
            with pytest.raises(icecache.OutOfRangeError) as e:
                client.append_kv_region(s.id, buf, 4096 - 100, small_spec().chunk_bytes(n), n)
            assert e.value.message
        assert client.get_session(s.id).tokens == 0
    finally:
        client.drop_session(s.id)


def test_permission_denied_without_admin_role(make_daemon):
    d = make_daemon(admin=False)
    with icecache.Client(socket=d.socket_path) as c:
        with pytest.raises(icecache.PermissionDeniedError):
            c.get_stats()
        with pytest.raises(icecache.PermissionDeniedError):
            c.list_sessions(all_tenants=True)


def test_resource_exhausted_at_the_session_limit(make_daemon):
    d = make_daemon("sessions { max_sessions_per_tenant: 1 }")
    with icecache.Client(socket=d.socket_path) as c:
        c.create_session(small_spec())
        with pytest.raises(icecache.ResourceExhaustedError):
            c.create_session(small_spec())


def test_unavailable_when_draining_and_when_nobody_listens(make_daemon, tmp_path):
    d = make_daemon()
    with icecache.Client(socket=d.socket_path) as c:
        c.drain()
        with pytest.raises(icecache.UnavailableError):
            c.create_session(small_spec())
    with icecache.Client(socket=str(tmp_path / "nobody.sock"), timeout=5) as c:
        with pytest.raises(icecache.UnavailableError):
            c.health()


def test_deadline_exceeded(make_daemon):
    d = make_daemon()
    with icecache.Client(socket=d.socket_path, timeout=0.3) as c:
        assert c.health()  # connected
        d.signal(signal.SIGSTOP)  # a daemon that does not answer in time
        try:
            with pytest.raises(icecache.DeadlineExceededError):
                c.list_sessions()
        finally:
            d.signal(signal.SIGCONT)


def test_unimplemented_method(client):
    call = client._channel.unary_unary("/icecache.v1.KvService/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert type(errors.from_rpc_error(info.value)) is icecache.UnimplementedError


def test_client_side_checks_raise_the_same_classes(client):
    with pytest.raises(icecache.InvalidArgumentError):
        icecache.Client(socket="relative/path.sock")
    with pytest.raises(icecache.InvalidArgumentError):
        icecache.Selector.parse("best")
    with pytest.raises(icecache.InvalidArgumentError):
        client.create_shm_buffer(0)
