"""The Ray fleet under failure and change, on a local Ray cluster (CPU, the tiny base), under load:

* a replica whose engine can no longer run a batch fails its health check and Ray replaces it;
* a replica killed with ``kill -9`` under load: what was in flight on it is sent to the other replica
  once (the ingress's retry) or answered 503 with Retry-After, nothing hangs, and the fleet is whole
  again (2 running replicas) soon after;
* a redeploy of a changed config (a new max batch) under load: no request fails;
* autoscaling 1 → 2 → 1 replicas under rising then falling load: every answer 200.

One cluster for the module (starting Ray is the slow part); the tests run in file order, and the last
two redeploy the app. Client timeouts are explicit: a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from medlego.jobs.synthetic import encode_png, random_adapter, random_image  # noqa: E402
from medlego.runtime.config import ServeConfig  # noqa: E402
from medlego.runtime.registry import Registry  # noqa: E402

from backends import free_port  # noqa: E402
from conftest import TINY_MODEL  # noqa: E402
from waiting import wait_until  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
PNGS = [encode_png(random_image(s, 32)) for s in range(3)]
CLIENT_TIMEOUT_S = 30.0  # no answer within this is a hang: the test fails
HEALTH_PERIOD_S = 1.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_base, tiny_base_file):
    """(ServeConfig, the replica deployment's handle); 2 fixed replicas, fault injection enabled."""
    from ray import serve

    from medlego.serving.ray_app import APP_NAME, ReplicaShape, start_local, stop_local

    data = tmp_path_factory.mktemp("failover")
    reg = Registry(data, base=tiny_base.spec)
    for i, name in enumerate(ADAPTERS):
        reg.register(name, random_adapter(tiny_base.spec, tiny_base.preprocess, rank=2, seed=70 + i).to_bytes())
    cfg = ServeConfig()
    cfg.base.model, cfg.base.weights = TINY_MODEL, str(tiny_base_file)
    cfg.server.data_dir, cfg.server.host, cfg.server.port = str(data), "127.0.0.1", free_port()
    cfg.batching.max_wait_ms = 2
    # inherited by the cluster's processes: inject_fault works, and load reaches the autoscaler twice a
    # second (Ray's default: every 10 s, which would leave the test's short delays meaningless)
    env = {"MEDLEGO_TEST_FAULTS": "1", "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
           "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        start_local(cfg, _shape(replicas=2), num_cpus=2, grpc=False)
        yield cfg, serve.get_deployment_handle("MedlegoReplica", APP_NAME)
    finally:
        stop_local()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shape(**kw):
    from medlego.serving.ray_app import ReplicaShape

    return ReplicaShape(cpus=0.5, torch_threads=1, health_period_s=HEALTH_PERIOD_S, **kw)


def _running() -> dict[str, int]:
    """replica id → process id of the replicas Ray Serve reports RUNNING (the controller's view: what
    `serve status` and the dashboard's Serve page show; serve.status() counts replicas but names none)."""
    from ray.serve.context import _get_global_client

    from medlego.serving.ray_app import APP_NAME

    client = _get_global_client()
    assert client is not None  # the fixture's start_local started Serve
    details = client.get_serve_details()
    reps = details["applications"][APP_NAME]["deployments"]["MedlegoReplica"]["replicas"]
    return {r["replica_id"]: r["pid"] for r in reps if r["state"] == "RUNNING"}


def _two_running() -> dict[str, int]:
    running: dict[str, int] = {}

    def two() -> bool:
        running.clear()
        running.update(_running())
        return len(running) == 2

    wait_until(two, timeout=60, interval=0.2, what="2 running replicas")
    return running


class Load:
    """Closed-loop clients diagnosing through the ingress until stopped; every outcome kept."""

    def __init__(self, url: str, clients: int):
        self.url, self.clients = url, clients
        self.outcomes: list[tuple[int, str, float, str]] = []  # (status or -1, replica, seconds, note)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def _client(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT_S) as c:
            k = n
            while not self.stopped.is_set() and k < n + 100_000:
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/diagnose", files={"file": ("x.png", PNGS[k % len(PNGS)])},
                               data={"adapter": ADAPTERS[k % len(ADAPTERS)]})
                    ok = r.status_code == 200
                    row = (r.status_code, r.json().get("replica", "") if ok else "",
                           time.monotonic() - t0, "" if ok else f"{r.headers.get('retry-after')}|{r.text[:200]}")
                except httpx.HTTPError as e:  # a timeout here is a hang
                    row = (-1, "", time.monotonic() - t0, f"{type(e).__name__}: {e}")
                with self.lock:
                    self.outcomes.append(row)
                k += self.clients

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT_S + 5)

    def count(self, status: int | None = None) -> int:
        with self.lock:
            return sum(1 for s, *_ in self.outcomes if status is None or s == status)

    def failures(self) -> list:
        with self.lock:
            return [o for o in self.outcomes if o[0] != 200]


def _url(cfg) -> str:
    return f"http://127.0.0.1:{cfg.server.port}"


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=CLIENT_TIMEOUT_S).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_replica_whose_engine_cannot_run_a_batch_is_replaced(fleet):
    cfg, handle = fleet
    before = _two_running()
    broken = handle.inject_fault.remote("device").result(timeout_s=CLIENT_TIMEOUT_S)
    assert broken in before
    t0 = time.monotonic()
    wait_until(lambda: (r := _running()) and len(r) == 2 and broken not in r, timeout=60, interval=0.2,
               what="the faulted replica replaced")
    print(f"\nfaulted replica {broken} replaced in {time.monotonic() - t0:.1f} s (health period "
          f"{HEALTH_PERIOD_S} s; a replica's start included)")
    with httpx.Client(base_url=_url(cfg), timeout=CLIENT_TIMEOUT_S) as c:
        for n in range(6):
            r = c.post("/v1/diagnose", files={"file": ("x.png", PNGS[0])}, data={"adapter": ADAPTERS[n % 4]})
            assert r.status_code == 200 and r.json()["replica"] != broken, r.text


def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(fleet):
    cfg, handle = fleet
    url = _url(cfg)
    running = _two_running()
    # the victim's batches take a second more: it surely holds requests in flight when it is killed
    victim = handle.inject_fault.remote("slow").result(timeout_s=CLIENT_TIMEOUT_S)
    pid = running[victim]
    retries_before = _metric(url, "medlego_replica_retries_total")
    with Load(url, clients=6) as load:
        wait_until(lambda: load.count(200) >= 20, timeout=60, what="load running")
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_until(lambda: victim not in _running(), timeout=30, interval=0.1, what="the killed replica noticed")
        noticed_s = time.monotonic() - t_kill
        wait_until(lambda: len(_running()) == 2, timeout=60, interval=0.2, what="the killed replica replaced")
        whole_s = time.monotonic() - t_kill
        n_at_whole = load.count()
        wait_until(lambda: load.count() >= n_at_whole + 20, timeout=60, what="load after the replacement")
    retried = _metric(url, "medlego_replica_retries_total") - retries_before
    failures = load.failures()
    slowest = max(o[2] for o in load.outcomes)
    print(f"\nkill -9 of {victim} (pid {pid}) under 6 clients: answered {load.count(200)}, retried by the "
          f"ingress {retried:.0f}, failed {len(failures)} ({sorted({o[0] for o in failures})}); death noticed "
          f"in {noticed_s:.1f} s, fleet whole again in {whole_s:.1f} s (a replica's start included); slowest "
          f"request {slowest:.1f} s")
    assert all(o[0] == 503 and o[3].split("|")[0] == "1" for o in failures), failures  # 503 + Retry-After
    assert len(failures) <= 6  # at most what was in flight on the victim (one per client)
    assert slowest < CLIENT_TIMEOUT_S
    assert load.count(200) >= 40
    assert retried >= 1  # what was in flight on the victim went to the other replica


def test_a_redeploy_with_a_new_max_batch_fails_no_request(fleet):
    from ray import serve

    from medlego.serving.ray_app import APP_NAME, build_app

    cfg, handle = fleet
    url = _url(cfg)
    before = _two_running()
    cfg.batching.max_batch = 8  # the replicas' init args change: Ray replaces them, rolling
    with Load(url, clients=4) as load:
        wait_until(lambda: load.count(200) >= 10, timeout=60, what="load running")
        t0 = time.monotonic()
        serve.run(build_app(cfg, _shape(replicas=2)), name=APP_NAME, route_prefix="/", blocking=False)
        wait_until(lambda: (r := _running()) and len(r) == 2 and not (set(r) & set(before)), timeout=90, interval=0.2,
                   what="both replicas replaced")
        rolled_s = time.monotonic() - t0
        n = load.count()
        wait_until(lambda: load.count() >= n + 10, timeout=60, what="load after the redeploy")
    print(f"\nredeploy (max_batch 8) under 4 clients: {load.count(200)} answered, {len(load.failures())} failed; "
          f"rolled in {rolled_s:.1f} s")
    assert not load.failures(), load.failures()[:5]
    assert handle.health.remote().result(timeout_s=CLIENT_TIMEOUT_S)["replica"] not in before


def test_autoscaling_up_and_down_under_load_answers_everything(fleet):
    from ray import serve

    from medlego.serving.ray_app import APP_NAME, build_app

    cfg, _ = fleet
    url = _url(cfg)
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "look_back_period_s": 2,
               "upscale_delay_s": 1, "downscale_delay_s": 3}
    # a replica full at 4 sends the rest to the new replica: without it the replica holding every adapter
    # takes all their traffic (Ray routes to the holder until it is full) and the added one idles
    serve.run(build_app(cfg, _shape(autoscaling=scaling, max_ongoing=4)), name=APP_NAME, route_prefix="/",
              blocking=False)
    wait_until(lambda: len(_running()) == 1, timeout=90, interval=0.2, what="scaled to min_replicas (1)")
    with Load(url, clients=8) as busy, Load(url, clients=1) as light:
        t0 = time.monotonic()
        wait_until(lambda: len(_running()) == 2, timeout=60, interval=0.2, what="scaled up to 2")
        up_s = time.monotonic() - t0
        n = busy.count()
        wait_until(lambda: busy.count() >= n + 20, timeout=60, what="load on 2 replicas")
        busy.__exit__()  # the light client keeps going while the fleet scales down
        t1 = time.monotonic()
        wait_until(lambda: len(_running()) == 1, timeout=60, interval=0.2, what="scaled down to 1")
        down_s = time.monotonic() - t1
        n = light.count()
        wait_until(lambda: light.count() >= n + 5, timeout=60, what="light load after scaling down")
    replicas = {o[1] for o in busy.outcomes + light.outcomes if o[0] == 200}
    print(f"\nautoscaling: 1 -> 2 in {up_s:.1f} s under 8 clients, 2 -> 1 in {down_s:.1f} s under 1; answered "
          f"{busy.count(200) + light.count(200)}, failed {len(busy.failures()) + len(light.failures())}; "
          f"replicas answering {len(replicas)}")
    assert not busy.failures() and not light.failures(), (busy.failures() + light.failures())[:5]
    assert len(replicas) >= 2


def test_health_and_spill_settings_reach_the_deployment_and_faults_stay_off(tiny_base_file, tmp_path, monkeypatch):
    from medlego.serving.ray_app import app_builder
    from medlego.serving.ray_resilience import inject_fault

    args = {"model": TINY_MODEL, "weights": str(tiny_base_file), "data_dir": str(tmp_path), "device": "cpu",
            "replicas": 2, "health_check_period_s": 2, "max_ongoing_requests": 64}
    replica = app_builder(args)._bound_deployment.init_args[0]._bound_deployment
    assert replica._deployment_config.health_check_period_s == 2.0
    assert replica._deployment_config.max_ongoing_requests == 64
    monkeypatch.delenv("MEDLEGO_TEST_FAULTS", raising=False)
    with pytest.raises(PermissionError, match="MEDLEGO_TEST_FAULTS=1"):  # a production replica cannot be broken
        inject_fault(None, "device")


def test_a_diagnosis_is_sent_once_more_then_answered_503():
    import asyncio

    from ray.exceptions import ActorDiedError

    from medlego.runtime.counters import Counters
    from medlego.runtime.errors import OverloadedError
    from medlego.serving.ray_resilience import once_more

    calls: list[int] = []

    async def dies_first(n_deaths: int):
        calls.append(1)
        if len(calls) <= n_deaths:
            raise ActorDiedError()
        return "answer"

    counters = Counters()
    assert asyncio.run(once_more(lambda: dies_first(1), counters)) == "answer" and len(calls) == 2
    calls.clear()
    with pytest.raises(OverloadedError, match="gone; retry") as e:  # 503 + Retry-After (http_errors.py)
        asyncio.run(once_more(lambda: dies_first(2), counters))
    assert e.value.status == 503 and len(calls) == 2  # once more, not more
    assert counters.snapshot()["counters"][("replica_retries", ())] == 2
