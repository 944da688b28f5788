"""Server configuration: one typed dataclass, filled from a TOML file, then the environment, then flags.

Config file (``--config FILE`` or ``$MEDLEGO_CONFIG``), every section and key optional::

    [server]
    host = "0.0.0.0"
    port = 8000
    grpc_port = 50051          # 0 = any free port; omit the gRPC server with grpc = false
    [auth]
    admin_token_file = "/run/secrets/medlego_admin"   # or admin_token = "..."
    api_token_file = "/run/secrets/medlego_api"       # optional: require a token for diagnosis
    [engine]                   # medlego.runtime.engine.EngineConfig
    device = "cuda"
    slots = 64
    [batching]                 # max_batch, max_wait_ms, max_queue, decode_workers
    max_batch = 32
    [limits]                   # medlego.serving.limits.Limits (bytes, pixels, counts)
    max_image_bytes = 16777216

``$MEDLEGO_ADMIN_TOKEN`` / ``$MEDLEGO_API_TOKEN`` override the file's tokens.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from medlego.runtime.engine import EngineConfig
from medlego.runtime.errors import BadInputError

from .auth import ADMIN_TOKEN_ENV, API_TOKEN_ENV, Auth
from .limits import Limits
from .service import BatchingConfig

CONFIG_ENV = "MEDLEGO_CONFIG"


@dataclass
class ServeConfig:
    model: str = ""
    weights: str | None = None
    pretrained: bool = False
    data_dir: str = "~/.medlego"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    grpc: bool = True
    log_level: str = "info"
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    admin_token: str | None = None
    api_token: str | None = None

    @property
    def auth(self) -> Auth:
        return Auth(admin_token=self.admin_token or None, api_token=self.api_token or None)


def _apply(obj, values: dict, section: str) -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names or dataclasses.is_dataclass(getattr(obj, key, None)):
            raise BadInputError(f"unknown setting [{section}] {key}; known: {', '.join(sorted(names))}")
        setattr(obj, key, value)


def _read_secret(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"token file not found: {p}")
    return p.read_text().strip()


def load_config(path: str | os.PathLike | None = None, env: dict | None = None) -> ServeConfig:
    """Defaults ← TOML file (path or $MEDLEGO_CONFIG) ← environment tokens."""
    env = os.environ if env is None else env
    cfg = ServeConfig()
    path = path or env.get(CONFIG_ENV)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise BadInputError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise BadInputError(f"config file {p} is not valid TOML: {e}") from None
        sections = {"server", "auth", "engine", "batching", "limits", "base"}
        unknown = set(data) - sections
        if unknown:
            raise BadInputError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(sections)}")
        server = dict(data.get("server", {}))
        _apply(cfg, {k: server.pop(k) for k in list(server) if k in ("host", "port", "grpc_port", "grpc", "log_level", "data_dir")},
               "server")
        if server:
            raise BadInputError(f"unknown setting(s) in [server]: {sorted(server)}")
        base = dict(data.get("base", {}))
        _apply(cfg, {k: base.pop(k) for k in list(base) if k in ("model", "weights", "pretrained")}, "base")
        if base:
            raise BadInputError(f"unknown setting(s) in [base]: {sorted(base)}")
        auth = dict(data.get("auth", {}))
        for kind in ("admin", "api"):
            if f"{kind}_token_file" in auth:
                setattr(cfg, f"{kind}_token", _read_secret(auth.pop(f"{kind}_token_file")))
            if f"{kind}_token" in auth:
                setattr(cfg, f"{kind}_token", str(auth.pop(f"{kind}_token")))
        if auth:
            raise BadInputError(f"unknown setting(s) in [auth]: {sorted(auth)}")
        _apply(cfg.engine, data.get("engine", {}), "engine")
        _apply(cfg.batching, data.get("batching", {}), "batching")
        _apply(cfg.limits, data.get("limits", {}), "limits")
    if env.get(ADMIN_TOKEN_ENV):
        cfg.admin_token = env[ADMIN_TOKEN_ENV]
    if env.get(API_TOKEN_ENV):
        cfg.api_token = env[API_TOKEN_ENV]
    return cfg


def build_service(cfg: ServeConfig, *, base=None, replica: str = ""):
    """Load the base (unless given), open the registry, build the engine and the service."""
    from medlego.runtime.base import load_base
    from medlego.runtime.engine import Engine
    from medlego.runtime.registry import Registry

    from .service import DiagnosisService

    if base is None:
        if not cfg.model:
            raise BadInputError("no base model: give --model NAME --weights FILE (or [base] in the config file)")
        base = load_base(cfg.model, cfg.weights, pretrained=cfg.pretrained)
    registry = Registry(Path(cfg.data_dir).expanduser(), base=base.spec, max_rank=cfg.engine.max_rank,
                        input_size=base.input_size)
    engine = Engine(base, registry, cfg.engine)
    return DiagnosisService(engine, limits=cfg.limits, auth=cfg.auth, batching=cfg.batching, replica=replica)


def config_to_dict(cfg: ServeConfig) -> dict:
    """A plain dict (JSON/YAML-able) of the whole configuration, for Ray deployments."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> ServeConfig:
    data = dict(data or {})
    cfg = ServeConfig()
    for section, obj in (("engine", cfg.engine), ("batching", cfg.batching), ("limits", cfg.limits)):
        _apply(obj, data.pop(section, None) or {}, section)
    _apply(cfg, data, "config")
    return cfg
