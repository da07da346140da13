"""The cluster settings: defaults (one node), validation naming the key, Membership.from_config."""

from __future__ import annotations

import pytest

from fastim.cluster.membership import Membership
from fastim.config import Config, ConfigError, load


def test_defaults_are_a_single_node() -> None:
    c = Config().validate()
    assert c.etcd_endpoints == "" and c.link_port == 0
    assert (c.cluster_name, c.etcd_prefix) == ("fastim", "/fastim")
    assert (c.node_lease_ttl, c.tree_k) == (5, 8)


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"etcd_endpoints": "localhost"}, "etcd_endpoints: 'localhost': expected host:port"),
        ({"etcd_endpoints": "https://e:2379"}, "etcd_endpoints: 'https://e:2379': TLS to etcd"),
        ({"cluster_name": ""}, "cluster_name: 1-64 letters"),
        ({"cluster_name": "a/b"}, "cluster_name: 1-64 letters"),
        ({"etcd_prefix": "fastim"}, "etcd_prefix: must start with '/'"),
        ({"etcd_prefix": "/fastim/"}, "etcd_prefix: must start with '/', not end with one"),
        ({"etcd_prefix": "/a b"}, "etcd_prefix"),
        ({"node_lease_ttl": 1}, "node_lease_ttl: must be 2..3600"),
        ({"link_port": 70000}, "link_port: must be 0..65535"),
        ({"tree_k": 1}, "tree_k: must be 2..1024"),
        ({"etcd_endpoints": "127.0.0.1:2379", "node_id": "a/b"}, "node_id: must not contain '/'"),
    ],
)
def test_bad_cluster_settings_are_named(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        Config(**settings).validate()  # type: ignore[arg-type]
    assert needle in str(e.value)


def test_cluster_settings_from_the_environment() -> None:
    env = {
        "FASTIM_ETCD_ENDPOINTS": "127.0.0.1:2379,127.0.0.1:22379",
        "FASTIM_CLUSTER_NAME": "prod-eu",
        "FASTIM_NODE_LEASE_TTL": "10",
        "FASTIM_LINK_PORT": "7072",
        "FASTIM_TREE_K": "4",
    }
    c = load(None, env, {})
    assert c.cluster_name == "prod-eu" and c.node_lease_ttl == 10 and c.tree_k == 4
    m = Membership.from_config(c, {"link": "127.0.0.1:7072"})
    assert m.endpoints == [("127.0.0.1", 2379), ("127.0.0.1", 22379)]
    assert m.cluster == "prod-eu" and m.ttl == 10 and m.node_id == c.node_id
    assert m.info.addresses == {"link": "127.0.0.1:7072"}
    assert m.request_timeout == pytest.approx(10 / 3)
