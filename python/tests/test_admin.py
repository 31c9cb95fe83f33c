"""Admin verbs and health through the Python client."""

from __future__ import annotations

import json

import pytest
from conftest import small_spec

import icecache


def test_stats_tenants_quota_pin_evict_config(client, daemon):
    s = client.create_session(small_spec())
    stats = client.get_stats()
    assert stats.sessions >= 1 and stats.capacity_bytes > 0 and stats.start is not None
    # No session here pushed to a GPU: nothing counted either way.
    assert stats.gpu_pushes_in_place == 0 and stats.gpu_pushes_staged == 0
    assert stats.pool_pinned_bytes >= 0
    tenant = client.get_session(s.id).tenant
    assert tenant in [t.tenant for t in client.list_tenants()]
    t = client.set_quota(tenant, 1 << 30)
    assert t.tenant == tenant and t.quota_bytes == 1 << 30
    client.set_quota(tenant, 0)
    assert client.pin_session(s.id, True).pinned
    assert not client.pin_session(s.id, False).pinned
    client.evict_session(s.id)
    with pytest.raises(icecache.NotFoundError):
        client.get_session(s.id)
    with pytest.raises(icecache.InvalidArgumentError):
        client.set_quota("", 1)
    text = client.get_config()
    assert daemon.socket_path in text
    cfg = json.loads(client.get_config(json=True))
    assert cfg["listen"]["unix_socket"] == daemon.socket_path
    assert client.health()


def test_drain_turns_health_not_serving(make_daemon):
    d = make_daemon()
    with icecache.Client(socket=d.socket_path) as c:
        s = c.create_session(small_spec())
        info = c.drain()
        assert info.sessions == 1
        assert c.health() is False
        assert c.get_session(s.id).id == s.id  # existing sessions keep working
