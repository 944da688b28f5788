from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DiagnoseRequest(_message.Message):
    __slots__ = ("adapter", "task", "image", "top_k")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    task: str
    image: bytes
    top_k: int
    def __init__(self, adapter: _Optional[str] = ..., task: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class DiagnoseResponse(_message.Message):
    __slots__ = ("adapter", "version", "sha256", "task", "multilabel", "probabilities", "top", "timings_ms", "replica", "rank_truncation")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MULTILABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    RANK_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    sha256: str
    task: str
    multilabel: bool
    probabilities: _containers.ScalarMap[str, float]
    top: _containers.RepeatedCompositeFieldContainer[Label]
    timings_ms: _containers.ScalarMap[str, float]
    replica: str
    rank_truncation: RankTruncation
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., task: _Optional[str] = ..., multilabel: _Optional[bool] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., top: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., replica: _Optional[str] = ..., rank_truncation: _Optional[_Union[RankTruncation, _Mapping]] = ...) -> None: ...

class RankTruncation(_message.Message):
    __slots__ = ("rank", "served_rank", "matrices_truncated", "dropped_mass", "max_matrix_dropped_mass")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SERVED_RANK_FIELD_NUMBER: _ClassVar[int]
    MATRICES_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_MASS_FIELD_NUMBER: _ClassVar[int]
    MAX_MATRIX_DROPPED_MASS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    served_rank: int
    matrices_truncated: int
    dropped_mass: float
    max_matrix_dropped_mass: float
    def __init__(self, rank: _Optional[int] = ..., served_rank: _Optional[int] = ..., matrices_truncated: _Optional[int] = ..., dropped_mass: _Optional[float] = ..., max_matrix_dropped_mass: _Optional[float] = ...) -> None: ...

class DiagnoseBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DiagnoseRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[DiagnoseRequest, _Mapping]]] = ...) -> None: ...

class DiagnoseBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DiagnoseResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[DiagnoseResponse, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("limit", "cursor", "prefix", "task", "base")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    cursor: str
    prefix: str
    task: str
    base: str
    def __init__(self, limit: _Optional[int] = ..., cursor: _Optional[str] = ..., prefix: _Optional[str] = ..., task: _Optional[str] = ..., base: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "labels", "multilabel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MULTILABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    multilabel: bool
    def __init__(self, name: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., multilabel: _Optional[bool] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("name", "version", "ref", "sha256", "size", "created", "pinned", "tasks", "aliases", "max_rank", "metadata_json", "rank_truncation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    RANK_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    ref: str
    sha256: str
    size: int
    created: str
    pinned: bool
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    max_rank: int
    metadata_json: str
    rank_truncation: RankTruncation
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., ref: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., created: _Optional[str] = ..., pinned: _Optional[bool] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., aliases: _Optional[_Iterable[str]] = ..., max_rank: _Optional[int] = ..., metadata_json: _Optional[str] = ..., rank_truncation: _Optional[_Union[RankTruncation, _Mapping]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "aliases", "next_cursor")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    aliases: _containers.ScalarMap[str, str]
    next_cursor: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., aliases: _Optional[_Mapping[str, str]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class DescribeAdapterRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("name", "data", "aliases", "move_aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MOVE_ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    aliases: _containers.RepeatedScalarFieldContainer[str]
    move_aliases: bool
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ..., aliases: _Optional[_Iterable[str]] = ..., move_aliases: _Optional[bool] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("ref", "all_versions")
    REF_FIELD_NUMBER: _ClassVar[int]
    ALL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ref: str
    all_versions: bool
    def __init__(self, ref: _Optional[str] = ..., all_versions: _Optional[bool] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("alive", "ready", "adapters", "device")
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    alive: bool
    ready: bool
    adapters: int
    device: str
    def __init__(self, alive: _Optional[bool] = ..., ready: _Optional[bool] = ..., adapters: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class ListAliasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAliasesResponse(_message.Message):
    __slots__ = ("aliases",)
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.ScalarMap[str, str]
    def __init__(self, aliases: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("alias", "target")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    alias: str
    target: str
    def __init__(self, alias: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("alias", "target", "resolves_to")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    RESOLVES_TO_FIELD_NUMBER: _ClassVar[int]
    alias: str
    target: str
    resolves_to: str
    def __init__(self, alias: _Optional[str] = ..., target: _Optional[str] = ..., resolves_to: _Optional[str] = ...) -> None: ...

class RemoveAliasRequest(_message.Message):
    __slots__ = ("alias",)
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    alias: str
    def __init__(self, alias: _Optional[str] = ...) -> None: ...

class RemoveAliasResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: str
    def __init__(self, removed: _Optional[str] = ...) -> None: ...

class MergeAdaptersRequest(_message.Message):
    __slots__ = ("name", "sources", "method", "params_json", "aliases", "task_names", "move_aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    TASK_NAMES_FIELD_NUMBER: _ClassVar[int]
    MOVE_ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    method: str
    params_json: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    task_names: _containers.RepeatedScalarFieldContainer[str]
    move_aliases: bool
    def __init__(self, name: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., params_json: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., task_names: _Optional[_Iterable[str]] = ..., move_aliases: _Optional[bool] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("since", "until", "adapter", "caller", "image_sha256", "kind", "limit", "after")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    since: str
    until: str
    adapter: str
    caller: str
    image_sha256: str
    kind: str
    limit: int
    after: int
    def __init__(self, since: _Optional[str] = ..., until: _Optional[str] = ..., adapter: _Optional[str] = ..., caller: _Optional[str] = ..., image_sha256: _Optional[str] = ..., kind: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[int] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("rows_json", "next_after")
    ROWS_JSON_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    rows_json: _containers.RepeatedScalarFieldContainer[str]
    next_after: int
    def __init__(self, rows_json: _Optional[_Iterable[str]] = ..., next_after: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("info_json",)
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    info_json: str
    def __init__(self, info_json: _Optional[str] = ...) -> None: ...
