"""Every setting of the server, its default (defined here once), and the TOML file that maps onto it.

A settings file (``--config FILE`` or ``$MEDLEGO_CONFIG``) has one table per section of
:class:`ServeConfig`, and one key per field; every table and key is optional::

    [base]
    model = "vit_base_patch16_224"
    weights = "/models/vit_base.safetensors"
    [server]
    host = "0.0.0.0"
    port = 8000
    grpc_port = 50051          # 0 = any free port; grpc = false serves REST only
    data_dir = "/var/lib/medlego"
    [registry]                 # the shared registry of a fleet (default: SQLite + folder in data_dir)
    url = "postgresql://medlego@db:5432/medlego"
    store = "s3://bucket/medlego"
    warm_on_start = true       # fetch the base's adapters into the node cache, in the background
    [auth]
    admin_token_file = "/run/secrets/medlego_admin"   # or admin_token = "..."
    api_token_file = "/run/secrets/medlego_api"       # optional: diagnosis needs a token too
    tokens_file = "/etc/medlego/tokens.toml"          # named callers: [[token]] name, role, sha256
    [audit]                    # the audit trail in the registry's database (runtime/registry/audit.py)
    probabilities = true       # false: only the top label and probability
    max_buffer = 4096          # rows in memory at most: what a kill -9 can lose (full: 503)
    signing_key = "/etc/medlego/audit.key"   # signed checkpoints in the store (medlego audit keygen)
    [engine]
    device = "cuda"
    [batching]
    max_batch = 32
    [limits]
    max_image_bytes = 16777216

Precedence: defaults ← the file ← the environment (tokens, data dir) ← command-line flags.
``$MEDLEGO_ADMIN_TOKEN`` / ``$MEDLEGO_API_TOKEN`` override the file's tokens whenever they are
set; tokens are trimmed, and one that is empty after trimming is refused at start-up.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError

CONFIG_ENV = "MEDLEGO_CONFIG"
DATA_DIR_ENV = "MEDLEGO_DATA_DIR"
ADMIN_TOKEN_ENV = "MEDLEGO_ADMIN_TOKEN"
API_TOKEN_ENV = "MEDLEGO_API_TOKEN"
DEFAULT_DATA_DIR = "~/.medlego"

MAX_IMAGE_PIXELS = 40_000_000  # decoded width × height × frames: the decompression-bomb guard
DECODE_DEADLINE_S = 5.0  # wall-clock budget of one image's decode + preprocessing


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir: the one given, else $MEDLEGO_DATA_DIR, else ~/.medlego."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


@dataclass
class BaseConfig:
    model: str = ""  # a timm ViT/DeiT name
    weights: str | None = None  # local weights file
    pretrained: bool = False  # let timm download weights instead


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    grpc: bool = True
    data_dir: str = DEFAULT_DATA_DIR
    log_level: str = "info"
    header_timeout_s: float = 10.0  # a connection must finish its request headers within this
    keep_alive_s: float = 30.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open HTTP connections; beyond, new ones are closed at once
    body_grace_s: float = 5.0  # after this long in a request body, it must average min_body_rate
    min_body_rate: float = 1024.0  # bytes/s a request body must keep after body_grace_s (else cut off)
    # how long a Python thread may hold the interpreter lock while another waits for it (CPython's
    # switch interval, 5 ms by default). The event loop waits that long for each turn it takes back
    # from busy decode and parse threads, several turns per request: at 5 ms, /healthz took up to
    # 120 ms during a hostile-DICOM burst on 2 cores, at 0.5 ms at most 19 ms (tests/test_decode_burst.py)
    switch_interval_ms: float = 0.5

    def apply_switch_interval(self) -> None:
        """Set this process's switch interval (a serving process: `medlego serve`, a Ray actor)."""
        if not 0 < self.switch_interval_ms <= 100:
            raise BadInputError(f"[server] switch_interval_ms must be above 0 and at most 100, got {self.switch_interval_ms}")
        sys.setswitchinterval(self.switch_interval_ms / 1000)


@dataclass
class RegistryConfig:
    url: str | None = None  # index: None = SQLite in data_dir; postgresql://USER@HOST:PORT/DB for a fleet
    store: str | None = None  # files: None = a folder in data_dir; s3://BUCKET/PREFIX for a fleet
    cache_dir: str | None = None  # node-local cache of store objects (S3 only); None = data_dir/cache
    cache_max_bytes: int | None = None  # None: the registry's default bound
    # at start, fetch the adapters made for the served base into the node cache, in the background (S3 only)
    warm_on_start: bool = False

    def registry_kwargs(self) -> dict:
        """The keyword arguments of :class:`~medlego.runtime.registry.Registry` that are set here (warm_on_start
        is the server's to act on, not the registry's)."""
        return {k: getattr(self, k) for k in ("url", "store", "cache_dir", "cache_max_bytes") if getattr(self, k) is not None}


@dataclass
class AuthConfig:
    admin_token: str | None = None  # None: the admin API is closed
    api_token: str | None = None  # None: diagnosis is open
    metrics_public: bool = False  # True: /metrics stays open when an API token is set
    tokens_file: str | None = None  # TOML of named callers: [[token]] name, role, sha256 (never the token)


@dataclass
class AuditConfig:
    """The audit trail (runtime/registry/audit.py), in the registry's database."""

    enabled: bool = True
    probabilities: bool = True  # store every class probability (False: only the top label)
    max_buffer: int = 4096  # rows held in memory at most: the most a kill -9 can lose
    batch_rows: int = 256  # write as soon as this many rows wait
    flush_interval_s: float = 0.2  # …and at least this often
    aggregate_interval_s: float = 10.0  # identical refusals within this: the first row, then one row counting the rest
    signing_key: str | None = None  # Ed25519 private key (medlego audit keygen): signed checkpoints in the store
    checkpoint_rows: int = 10000  # a signed checkpoint at least every this many rows…
    checkpoint_interval_s: float = 10.0  # …or this often while rows are written (and at close)


@dataclass
class EngineConfig:
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    kernel: str = "auto"  # auto (measured per batch bucket on CUDA; the reference on CPU) | fused | split | torch
    kernel_cache: str | None = None  # where measured choices are kept (the server: data_dir/kernel_choice.json)
    cuda_graphs: bool = False  # replay the trunk from CUDA graphs per batch bucket (needs a Triton kernel)
    pad_batches: bool | None = None  # pad each batch to its power-of-two bucket (None: when cuda_graphs)
    slots: int = 64  # device-tier capacity, in adapters
    unpinned_slots: int | None = None  # slots pins may never take (None: a quarter of the slots, at least 1)
    host_capacity: int = 1024  # host-tier capacity, in adapters
    load_workers: int = 2  # threads loading cold adapters from the store (never the decode workers)
    load_timeout_s: float = 10.0  # a request waits this long for a cold adapter's load, then gets 503
    max_rank: int = 16  # the largest adapter rank the pool serves
    over_rank: str = "refuse"  # an adapter above max_rank: "refuse" it, or "truncate": serve its top max_rank singular directions
    max_pass_images: int = 64  # one trunk pass holds at most this many images; larger infer() calls are split
    top_k: int = 5

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if self.dtype not in dtypes:
            raise BadInputError(f"unknown dtype '{self.dtype}'; choose from float32, bfloat16, float16")
        return dtypes[self.dtype]

    @property
    def reserved_slots(self) -> int:
        """Slots that pinned adapters can never fill, so that every other adapter can still be served."""
        wanted = self.unpinned_slots if self.unpinned_slots is not None else self.slots // 4
        return min(self.slots, max(1, wanted))


@dataclass
class BatchingConfig:
    max_batch: int = 32  # images per engine batch
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # queued requests before new ones get 503
    decode_workers: int = 2  # threads decoding and preprocessing images


@dataclass
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024  # a whole HTTP request / gRPC message
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded image
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded width × height × frames
    max_image_side: int = 16384  # decoded width or height
    decode_deadline_s: float = DECODE_DEADLINE_S
    max_adapter_bytes: int = 64 * 1024 * 1024  # one adapter upload
    max_batch_images: int = 64  # images in one batch request
    max_top_k: int = 1000
    max_json_elements: int = 2_000_000  # values in one JSON body (parsed in a thread; beyond: 413)


@dataclass
class ServeConfig:
    """What `medlego serve` runs with; each field is one table of the settings file."""

    base: BaseConfig = field(default_factory=BaseConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: Limits = field(default_factory=Limits)
    audit: AuditConfig = field(default_factory=AuditConfig)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir).expanduser()


# -- the settings file -----------------------------------------------------------------------------
_TOKEN_FILES = {"admin_token_file": "admin_token", "api_token_file": "api_token"}
_MOVED = {("engine", "max_batch"): "[batching] max_batch (images per engine batch)"}


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(ServeConfig)}  # type: ignore[misc]


def _check_type(section: str, f: dataclasses.Field, value):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    optional = "None" in kind
    if value is None and optional:
        return None
    base = kind.replace("| None", "").strip()
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}.get(base, True)
    if not ok:
        raise BadInputError(f"setting [{section}] {f.name} must be of type {base}, got {value!r}")
    return float(value) if base == "float" else value


def apply_section(obj, section: str, values: dict) -> None:
    """Set the fields of one section from a mapping; unknown keys and wrong types are one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if (section, key) in _MOVED:
            raise BadInputError(f"setting [{section}] {key} has moved to {_MOVED[section, key]}")
        if key not in fields:
            raise BadInputError(f"unknown setting [{section}] {key}; known: {', '.join(sorted(fields))}")
        setattr(obj, key, _check_type(section, fields[key], value))


def _read_secret(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"token file not found: {p}")
    return p.read_text()


def _token(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    token = value.strip()
    if not token:
        raise BadInputError(f"the token from {where} is empty; give a real token or unset it")
    return token


def read_toml(path: str | os.PathLike, what: str) -> dict:
    """A TOML file's tables, or a one-line error naming `what` it is (a missing file, invalid TOML)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{what} {p} is not valid TOML: {e}") from None


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> ServeConfig:
    """Defaults ← TOML file (path or $MEDLEGO_CONFIG) ← environment (tokens, data dir)."""
    env = os.environ if env is None else env
    cfg = ServeConfig()
    path = path or env.get(CONFIG_ENV)
    if path:
        data = read_toml(path, "config file")
        sections = _sections()
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise BadInputError(f"unknown config section(s) {unknown}; known: {sorted(sections)}")
        for name, values in data.items():
            if not isinstance(values, dict):
                raise BadInputError(f"config entry '{name}' must be a table ([{name}])")
            values = dict(values)
            if name == "auth":
                for file_key, key in _TOKEN_FILES.items():
                    if file_key in values:
                        values[key] = _token(_read_secret(values.pop(file_key)), f"[auth] {file_key}")
            apply_section(getattr(cfg, name), name, values)
    cfg.auth.admin_token = _token(cfg.auth.admin_token, "[auth] admin_token")
    cfg.auth.api_token = _token(cfg.auth.api_token, "[auth] api_token")
    for var, key in ((ADMIN_TOKEN_ENV, "admin_token"), (API_TOKEN_ENV, "api_token")):
        if var in env:
            setattr(cfg.auth, key, _token(env[var], f"${var}"))
    if cfg.server.data_dir == DEFAULT_DATA_DIR:
        cfg.server.data_dir = str(default_data_dir())
    return cfg


def config_to_dict(cfg: ServeConfig) -> dict:
    """A plain dict (JSON/YAML-able) of the whole configuration, for Ray deployments."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> ServeConfig:
    cfg = ServeConfig()
    for name, values in (data or {}).items():
        if name not in _sections():
            raise BadInputError(f"unknown config section '{name}'")
        apply_section(getattr(cfg, name), name, dict(values or {}))
    return cfg
