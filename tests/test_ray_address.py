"""`medlego serve --ray --address HEAD:PORT` (``start_local(address=…)``): the app is deployed on a Ray
cluster that is already running (what ``ray start --head`` makes), instead of starting one; the
cluster's own CPUs stand (``--num-cpus`` is refused with it), and stopping removes the app only."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("ray.serve")

from medlego.jobs.synthetic import encode_png, random_adapter, random_image  # noqa: E402
from medlego.runtime.config import ServeConfig  # noqa: E402
from medlego.runtime.errors import BadInputError  # noqa: E402
from medlego.runtime.registry import Registry  # noqa: E402

from backends import free_port  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402


def test_deploys_on_a_running_cluster_and_leaves_it_running(tiny_base, tiny_base_file, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from medlego.serving.ray_app import ReplicaShape, start_local, stop_local

    Registry(tmp_path, base=tiny_base.spec).register(
        "d0", random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2, seed=5).to_bytes())
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(tiny_base_file)
    cfg.server.data_dir, cfg.server.host, cfg.server.port = str(tmp_path), "127.0.0.1", free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        with pytest.raises(BadInputError, match="leave out --num-cpus"):
            start_local(cfg, ReplicaShape(cpus=0.5, torch_threads=1), num_cpus=2, address=cluster.address)
        assert not ray.is_initialized()
        start_local(cfg, ReplicaShape(cpus=0.5, torch_threads=1), grpc=False, address=cluster.address)
        assert ray.get_runtime_context().gcs_address == cluster.address  # joined, not a cluster of its own
        r = httpx.post(f"http://127.0.0.1:{cfg.server.port}/v1/diagnose", timeout=60,
                       files={"file": ("x.png", encode_png(random_image(1, 32)))}, data={"adapter": "d0"})
        assert r.status_code == 200 and r.json()["adapter"] == "d0", r.text
        stop_local()
        assert cluster.remaining_processes_alive()  # the cluster outlives the app
    finally:
        stop_local()
        cluster.shutdown()
