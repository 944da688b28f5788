"""Ray Serve over a fleet: a Ray cluster of two nodes on this machine, exactly one engine replica on
each (placed by a custom resource both nodes offer once), the registry on PostgreSQL + S3, and a
node cache per node (``{node}`` in the cache dir). Deployed through ``app_builder``, as
``serve deploy`` would.

An adapter registered through the ingress is answered by both replicas: it is registered under
several names with identical bytes (one object, one sha256), and Ray routes a model id that no
replica holds yet to the replica holding the fewest models, so consecutive names alternate
between the replicas. Each replica's node cache then holds the object. A pinned adapter's delete
is refused by each replica: admin calls carrying a model id that replica holds go to it, and the
refusal names who refused.
"""

from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from medlego.jobs.synthetic import encode_png, random_adapter, random_image  # noqa: E402
from medlego.runtime.config import ServerConfig  # noqa: E402

from backends import free_port  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402

ADMIN = "fleet-admin"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
TWINS = [f"scan{i}" for i in range(4)]  # one adapter, four names
PNG = encode_png(random_image(5, 32))


@pytest.fixture
def fleet(fleet_backend, tiny_base_file, tmp_path, monkeypatch):
    """(ingress URL, node cache root, the replica deployment's handle); two nodes, one replica each."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from medlego.serving.ray_app import APP_NAME, app_builder, deploy

    monkeypatch.setenv("MEDLEGO_ADMIN_TOKEN", ADMIN)  # read by app_builder; the S3 variables reach the nodes too
    node = {"num_cpus": 1, "resources": {"medlego": 1}, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        args = {"model": TINY_MODEL, "weights": str(tiny_base_file), "data_dir": str(tmp_path / "data"),
                "device": "cpu", "registry_url": fleet_backend.url, "registry_store": fleet_backend.store,
                "registry_cache_dir": str(tmp_path / "cache" / "{node}"), "replicas": 2, "replica_cpus": 1,
                "replica_resources": {"medlego": 1}, "torch_threads": 1}
        server = ServerConfig(host="127.0.0.1", port=free_port())
        deploy(app_builder(args), server, grpc=False)
        yield f"http://127.0.0.1:{server.port}", tmp_path / "cache", serve.get_deployment_handle(
            "MedlegoReplica", APP_NAME)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def _answers_from_both_replicas(url: str) -> dict[str, dict]:
    """Diagnose the twin names in turn until two replicas have answered; name → answer."""
    answers: dict[str, dict] = {}
    for name in TWINS * 2:
        r = httpx.post(url + "/v1/diagnose", files={"file": ("a.png", PNG)}, data={"adapter": name}, timeout=60)
        assert r.status_code == 200, r.text
        answers[name] = r.json()
        if len({a["replica"] for a in answers.values()}) == 2:
            return answers
        time.sleep(0.5)  # a replica reports the ids it holds to the routers every 0.1 s
    pytest.fail(f"one replica answered every name: {[(n, a['replica']) for n, a in answers.items()]}")


def _on(replicas, model_id: str):
    """The replica deployment's handle, routed like a request for `model_id` (to a replica holding it)."""
    return replicas.options(multiplexed_model_id=model_id)


def _per_replica(held_by: dict[str, str], call, replica_of) -> dict[str, dict]:
    """replica → the answer of `call(model_id)` that replica gave, calling with each replica's model id
    until every replica has answered (a router may not know yet who holds what: then it asks again)."""
    answers: dict[str, dict] = {}
    for _ in range(10):
        for model_id in held_by.values():
            answer = call(model_id).result(timeout_s=60)
            answers.setdefault(replica_of(answer), answer)
        if set(answers) == set(held_by):
            return answers
        time.sleep(0.5)
    pytest.fail(f"answered only by {sorted(answers)}, not by every replica of {sorted(held_by)}")


def test_both_replicas_serve_and_refuse_through_their_own_node(fleet, tiny_base):
    url, caches, replicas = fleet
    data = random_adapter(tiny_base.spec, tiny_base.preprocess, rank=3, seed=77).to_bytes()
    shas = set()
    for name in TWINS:
        r = httpx.post(url + "/v1/adapters", headers=HEADERS, files={"file": ("a.safetensors", data)},
                       data={"name": name}, timeout=60)
        assert r.status_code == 201, r.text
        shas.add(r.json()["sha256"])
    (sha,) = shas

    # answered by both replicas, with the same content: the same probabilities
    answers = _answers_from_both_replicas(url)
    first, *rest = answers.values()
    for a in rest:
        assert a["sha256"] == sha and a["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
    held_by = {a["replica"]: f"{name}@1" for name, a in answers.items()}  # replica → a model id it holds
    print(f"\nanswered by: {[(name, a['replica']) for name, a in answers.items()]}")

    # each replica loaded the object through its own node's cache; the nodes are distinct
    nodes = _per_replica(held_by, lambda model_id: _on(replicas, model_id).health.remote(), lambda h: h["replica"])
    nodes = {replica: h["node"] for replica, h in nodes.items()}
    assert len({n["node_id"] for n in nodes.values()}) == 2
    for n in nodes.values():
        assert n["cache_dir"] == str(caches / n["node_id"])
        assert (caches / n["node_id"] / f"{sha}.safetensors").is_file()
    assert sorted(p.name for p in caches.iterdir()) == sorted(n["node_id"] for n in nodes.values())

    # pinned through the ingress: a delete is refused through the ingress, and by each replica
    assert httpx.post(url + f"/v1/adapters/{TWINS[0]}@1/pin", headers=HEADERS, timeout=60).status_code == 200
    for _ in range(3):
        r = httpx.delete(url + f"/v1/adapters/{TWINS[0]}@1", headers=HEADERS, timeout=60)
        assert r.status_code == 409 and "pinned" in r.json()["detail"], r.text
    refusals = _per_replica(held_by, lambda model_id: _on(replicas, model_id).admin.remote(
        "delete", f"{TWINS[0]}@1", False), lambda record: record["error"]["replica"])
    for record in refusals.values():
        assert record["error"]["type"] == "AdapterPinnedError", record
    r = httpx.get(url + f"/v1/adapters/{TWINS[0]}@1", timeout=60)
    assert r.status_code == 200 and r.json()["pinned"] is True
