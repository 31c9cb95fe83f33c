"""Sessions and the connection rules (socket search order, environment)."""

from __future__ import annotations

import os

import pytest
from conftest import small_spec

import icecache
from icecache.connection import default_socket_candidates, resolve_target


def test_create_get_list_keep_alive_drop(client):
    spec = small_spec(selector=icecache.Selector.QUEST, ttl_s=30, pinned=False)
    s = client.create_session(spec)
    assert s.id and s.tokens == 0 and s.epoch > 0
    assert s.spec.layers == 2 and s.spec.q_heads == 4 and s.spec.dtype is icecache.DType.FLOAT16
    assert s.spec.selector is icecache.Selector.QUEST
    assert s.spec.ttl_s == 30
    got = client.get_session(s.id)
    assert got.id == s.id and got.created is not None
    assert s.id in [x.id for x in client.list_sessions()]
    (expires,) = client.keep_alive(s.id)
    assert expires >= s.expires
    client.drop_session(s.id)
    with pytest.raises(icecache.NotFoundError):
        client.get_session(s.id)
    with pytest.raises(icecache.NotFoundError):
        client.keep_alive([s.id])


def test_session_defaults_come_back_filled_in(client):
    s = client.create_session(small_spec(page_tokens=0))
    try:
        assert s.spec.page_tokens > 0  # the daemon's default
        assert s.spec.defaults.budget_tokens is not None
    finally:
        client.drop_session(s.id)


def test_mdci_codes_are_the_default_and_zero_turns_them_off(client):
    # Unset: the daemon's default product-quantised scan (pq_factor 8).
    s = client.create_session(small_spec(selector=icecache.Selector.MDCI))
    try:
        assert s.spec.mdci is not None and s.spec.mdci.pq_factor == 8.0
    finally:
        client.drop_session(s.id)
    # 0: the tree's descent only, and it reads back as asked.
    s = client.create_session(
        small_spec(selector=icecache.Selector.MDCI, mdci=icecache.MdciParams(pq_factor=0.0))
    )
    try:
        assert s.spec.mdci.pq_factor == 0.0
    finally:
        client.drop_session(s.id)
    # A head_dim the codes cannot take: no codes by default, an error if asked.
    s = client.create_session(small_spec(selector=icecache.Selector.MDCI, head_dim=36))
    try:
        assert s.spec.mdci.pq_factor == 0.0
    finally:
        client.drop_session(s.id)
    with pytest.raises(icecache.InvalidArgumentError, match="pq_factor"):
        client.create_session(
            small_spec(selector=icecache.Selector.MDCI, head_dim=36, mdci=icecache.MdciParams(pq_factor=8.0))
        )


# An optional MdciParams field: unset reads back as the daemon's default, 0
# as 0 (carry_keep_factor: every candidate carried; insert_fit: every decode
# key routed), and a value out of range is refused naming the field.
@pytest.mark.parametrize(
    "field, default, bad",
    [("carry_keep_factor", 4.0, 0.5), ("insert_fit", 2.0, -1.0)],
)
def test_an_mdci_option_reads_back_and_a_bad_one_is_refused(client, field, default, bad):
    for mdci, want in ((None, default), (icecache.MdciParams(**{field: 0.0}), 0.0)):
        s = client.create_session(small_spec(selector=icecache.Selector.MDCI, mdci=mdci))
        try:
            assert getattr(s.spec.mdci, field) == want
        finally:
            client.drop_session(s.id)
    with pytest.raises(icecache.InvalidArgumentError, match=field):
        client.create_session(
            small_spec(selector=icecache.Selector.MDCI, mdci=icecache.MdciParams(**{field: bad}))
        )


def test_socket_from_environment(daemon, monkeypatch):
    monkeypatch.setenv("ICECACHE_SOCKET", daemon.socket_path)
    monkeypatch.delenv("ICECACHE_ADDRESS", raising=False)
    with icecache.Client() as c:
        assert c.target == "unix:" + daemon.socket_path
        assert c.health()


def test_unix_prefix_and_argument_beats_environment(daemon, monkeypatch):
    monkeypatch.setenv("ICECACHE_SOCKET", "/nonexistent/else.sock")
    with icecache.Client(socket="unix:" + daemon.socket_path) as c:
        assert c.target == "unix:" + daemon.socket_path


def test_default_search_order(monkeypatch, tmp_path):
    monkeypatch.delenv("ICECACHE_SOCKET", raising=False)
    monkeypatch.delenv("ICECACHE_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    cands = default_socket_candidates()
    assert cands == [
        "/run/icecache/icecached.sock",
        str(tmp_path / "icecached.sock"),
        f"/tmp/icecached-{os.getuid()}.sock",
    ]
    if not os.path.exists(cands[0]):
        # none exists: where a daemon of this uid would listen (writable dir)
        want = cands[0] if os.access("/run/icecache", os.W_OK) else str(tmp_path / "icecached.sock")
        assert resolve_target().grpc_target == "unix:" + want
        (tmp_path / "icecached.sock").write_text("")
        assert resolve_target().grpc_target == "unix:" + str(tmp_path / "icecached.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert len(default_socket_candidates()) == 2
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/" + "x" * 100)
    assert len(default_socket_candidates()) == 2  # would not fit a sockaddr_un


def test_address_means_tls_with_token_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ICECACHE_ADDRESS", "daemon.example:50051")
    monkeypatch.setenv("ICECACHE_TOKEN", "t" * 20)
    t = resolve_target()
    assert t.tls and t.grpc_target == "daemon.example:50051" and t.token == "t" * 20
    with pytest.raises(icecache.NotFoundError):
        resolve_target(ca=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize(
    "name", ["arkvale", "pqcache", "snapkv", "omnikv", "magicpig", "mdci-published"]
)
def test_baseline_selectors_are_session_selectors(client, name):
    selector = icecache.Selector.parse(name)
    assert selector.label == name
    s = client.create_session(small_spec(selector=selector, ttl_s=30, pinned=False))
    try:
        assert client.get_session(s.id).spec.selector is selector
    finally:
        client.drop_session(s.id)
