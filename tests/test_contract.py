"""Both implementations of the serving contract against the protocols of serving/contract.py.

Every member a transport calls is declared on ``DiagnosisAPI`` (or ``AdminAPI``, its ``admin``), and
the in-process service and the Ray frontend each implement every one with the declared signature:
the same parameters (names, kinds, defaults, annotations), the same return annotation and the same
coroutine-ness. ``isinstance`` against a ``runtime_checkable`` protocol only checks that the names
exist; the signatures are compared here, and the checker is itself shown to catch a missing method
and a changed signature.
"""

from __future__ import annotations

import inspect

import pytest

from medlego.runtime.config import BatchingConfig, EngineConfig, ServeConfig
from medlego.runtime.engine import Engine
from medlego.runtime.registry import Registry
from medlego.serving.admin import AdminOperations
from medlego.serving.contract import AdminAPI, DiagnosisAPI
from medlego.serving.service import DiagnosisService


def members(protocol) -> set[str]:
    """A protocol's members: its methods and its annotated data members (typing keeps no public list)."""
    return {n for n in vars(protocol) if not n.startswith("_")} | set(vars(protocol).get("__annotations__", {}))


def _protocol_methods(protocol) -> dict:
    return {name: getattr(protocol, name) for name in members(protocol) if callable(getattr(protocol, name, None))}


def _data_members(protocol) -> set[str]:
    return members(protocol) - set(_protocol_methods(protocol))


def mismatches(protocol, cls) -> list[str]:
    """Every way `cls` departs from `protocol`'s methods: missing, coroutine or not, signature."""
    out = []
    for name, declared in _protocol_methods(protocol).items():
        actual = getattr(cls, name, None)
        if actual is None:
            out.append(f"{cls.__name__}.{name} is missing")
            continue
        if inspect.iscoroutinefunction(declared) != inspect.iscoroutinefunction(actual):
            out.append(f"{cls.__name__}.{name}: coroutine {inspect.iscoroutinefunction(actual)}, declared "
                       f"{inspect.iscoroutinefunction(declared)}")
        want, got = inspect.signature(declared), inspect.signature(actual)
        if want != got:
            out.append(f"{cls.__name__}.{name}{got} differs from the contract's {name}{want}")
    return out


def _ray_classes():
    pytest.importorskip("ray")
    from medlego.serving.ray_frontend import RayAdmin, RayFrontend

    return RayFrontend, RayAdmin


def test_every_transport_call_is_declared_on_the_contract():
    """What the transports call on the contract: each name is a member of DiagnosisAPI or AdminAPI."""
    import re
    from pathlib import Path

    import medlego.serving as serving

    root = Path(serving.__file__).parent
    declared, admin = members(DiagnosisAPI), members(AdminAPI)
    sources = [root / "grpc_service.py", root / "kserve.py", root / "kserve_rest.py", root / "kserve_grpc.py",
               root / "app.py", *sorted((root / "rest").glob("*.py"))]
    called = set()
    for path in sources:
        text = path.read_text()
        called |= {(m.group(1), m.group(2)) for m in re.finditer(r"(?<![\w.])(?:service|api|self\.api)\.(admin\.)?(\w+)", text)}
    missing = sorted(f"{'admin.' if a else ''}{n}" for a, n in called if n not in (admin if a else declared)
                     and not (not a and n == "admin"))
    assert not missing, f"called through the contract but not declared on it: {missing}"


def test_the_service_implements_the_contract():
    assert mismatches(DiagnosisAPI, DiagnosisService) == []
    assert mismatches(AdminAPI, AdminOperations) == []


def test_the_ray_frontend_implements_the_contract():
    frontend, admin = _ray_classes()
    assert mismatches(DiagnosisAPI, frontend) == []
    assert mismatches(AdminAPI, admin) == []


def test_instances_have_every_member(tmp_path, tiny_base):
    registry = Registry(tmp_path / "data", base=tiny_base.spec, max_rank=16, input_size=tiny_base.input_size)
    service = DiagnosisService(Engine(tiny_base, registry, EngineConfig(slots=2)), batching=BatchingConfig(max_batch=2))
    try:
        assert isinstance(service, DiagnosisAPI) and isinstance(service.admin, AdminAPI)
        assert _data_members(DiagnosisAPI) == {"limits", "auth", "admin"}
    finally:
        service.close()
    RayFrontend, _ = _ray_classes()
    cfg = ServeConfig()
    cfg.server.data_dir = str(tmp_path / "ray-data")
    frontend = RayFrontend(replicas=None, cfg=cfg)
    try:
        assert isinstance(frontend, DiagnosisAPI) and isinstance(frontend.admin, AdminAPI)
    finally:
        frontend.bridge.stop()
        frontend.close()


def test_the_check_catches_a_missing_method_and_a_changed_signature():
    class Missing(DiagnosisService):
        pass

    Missing.metrics_text = None  # type: ignore[assignment]  # as if the method were not there
    assert any("metrics_text is missing" in m for m in mismatches(DiagnosisAPI, Missing))

    class Changed(AdminOperations):
        async def delete(self, ref: str, everything: bool = False) -> list[str]:  # type: ignore[override]
            return []

    assert any("delete" in m for m in mismatches(AdminAPI, Changed))

    class NotACoroutine(AdminOperations):
        def pin(self, ref: str) -> dict:  # type: ignore[override]
            return {}

    assert any("coroutine" in m for m in mismatches(AdminAPI, NotACoroutine))
