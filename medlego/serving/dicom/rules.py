"""The DICOM routing rules file (``medlego serve --dicom-rules FILE``, TOML; docs/dicom.md).

Which adapters diagnose an instance is decided here, from its header and the calling AE title: the
first ``[[rule]]`` whose every given condition holds names the adapters (each an SR of its own).
Conditions: ``modality``, ``body_part``, ``sop_class`` and ``calling_ae`` (a value or a list of
values, compared as DICOM code strings: trimmed, upper case, except UIDs) and ``series_description``
(a regular expression searched in the description). The same file says where the SRs go
(``[destination.NAME]``), the DIMSE door's AE title, port and allow-list (``[dimse]``), the STOW-RS
door's destination (``[dicomweb]``) and each adapter's finding codes (``[codes."ADAPTER"]``).
Everything is checked when the file is loaded: a mistake is one line naming it, at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from medlego.runtime.config import read_toml
from medlego.runtime.errors import BadInputError

CONDITIONS = ("modality", "body_part", "sop_class", "calling_ae", "series_description")
_RULE_KEYS = {*CONDITIONS, "name", "adapters", "adapter", "task"}
_TOP_KEYS = {"rule", "codes", "destination", "dicomweb", "dimse"}
LOCAL_SCHEME = "99MEDLEGO"  # the private coding scheme of a label without a configured code


@dataclass(frozen=True)
class Target:
    """One adapter (and task) an instance is diagnosed with."""

    adapter: str
    task: str | None = None


@dataclass
class Rule:
    name: str
    targets: list[Target]
    conditions: dict[str, Any] = field(default_factory=dict)  # key -> tuple of values, or a compiled regex

    def matches(self, attrs: dict[str, str]) -> bool:
        for key, want in self.conditions.items():
            value = attrs.get(key, "")
            if key == "series_description":
                if not want.search(value):
                    return False
            elif _norm(key, value) not in want:
                return False
        return True

    def to_json(self) -> dict:
        conds = {k: (v.pattern if k == "series_description" else list(v)) for k, v in self.conditions.items()}
        return {"name": self.name, "when": conds,
                "adapters": [{"adapter": t.adapter, "task": t.task} for t in self.targets]}


@dataclass
class Destination:
    """Where SRs are stored: a DICOMweb service (its STOW-RS base URL) or a DIMSE AE."""

    name: str
    dicomweb: str | None = None
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None

    def to_json(self) -> dict:
        if self.dicomweb:
            return {"name": self.name, "dicomweb": self.dicomweb}
        return {"name": self.name, "ae_title": self.ae_title, "host": self.host, "port": self.port}


@dataclass
class Rules:
    rules: list[Rule] = field(default_factory=list)
    codes: dict[str, dict[str, tuple[str, str, str]]] = field(default_factory=dict)  # adapter -> label -> code
    destinations: dict[str, Destination] = field(default_factory=dict)
    dicomweb_destination: str | None = None
    dimse: dict[str, Any] = field(default_factory=dict)  # ae_title, port, allow (list), destination

    def match(self, attrs: dict[str, str]) -> Rule | None:
        """The first rule whose every condition holds for these attributes (None: no rule matched)."""
        return next((r for r in self.rules if r.matches(attrs)), None)

    def destination(self, door: str) -> Destination | None:
        name = self.dicomweb_destination if door == "dicomweb" else self.dimse.get("destination")
        return self.destinations.get(name) if name else None

    def adapters(self) -> list[str]:
        return sorted({t.adapter for r in self.rules for t in r.targets})

    def code(self, adapter_name: str, label: str) -> tuple[str, str, str]:
        """(value, scheme, meaning) of a label: the rules file's, else the label in 99MEDLEGO."""
        configured = self.codes.get(adapter_name, {}).get(label)
        return configured if configured is not None else local_code(label)

    def to_json(self) -> dict:
        return {"rules": [r.to_json() for r in self.rules],
                "codes": {a: {lab: {"value": c[0], "scheme": c[1], "meaning": c[2]} for lab, c in m.items()}
                          for a, m in self.codes.items()},
                "destinations": [d.to_json() for d in self.destinations.values()],
                "dicomweb": {"destination": self.dicomweb_destination},
                "dimse": {k: v for k, v in self.dimse.items()}}


def local_code(label: str) -> tuple[str, str, str]:
    """A label's code in the local scheme: the label itself when it fits a code value (16
    characters of SH), else its first 11 characters and a hash, so two long labels stay distinct."""
    import hashlib

    value = label if len(label) <= 16 else label[:11] + hashlib.sha1(label.encode()).hexdigest()[:5]
    return value, LOCAL_SCHEME, label[:64]


def _norm(key: str, value: str) -> str:
    return str(value).strip() if key == "sop_class" else str(value).strip().upper()


def load_rules(path: str) -> Rules:
    """The rules file, checked; a mistake is a one-line BadInputError naming the file and the entry."""
    data = read_toml(path, "DICOM rules file")
    where = f"DICOM rules file {path}"
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise BadInputError(f"{where}: unknown table(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_TOP_KEYS))}")
    out = Rules()
    for n, entry in enumerate(_list(data.get("rule", []), f"{where}: [[rule]]")):
        out.rules.append(_rule(entry, f"{where}: rule {n + 1}"))
    for adapter, labels in _table(data.get("codes", {}), f"{where}: [codes]").items():
        out.codes[adapter] = {lab: _code(c, f"{where}: [codes.\"{adapter}\"] {lab}")
                              for lab, c in _table(labels, f"{where}: [codes.\"{adapter}\"]").items()}
    for name, d in _table(data.get("destination", {}), f"{where}: [destination]").items():
        out.destinations[name] = _destination(name, d, f"{where}: [destination.{name}]")
    web = _table(data.get("dicomweb", {}), f"{where}: [dicomweb]")
    out.dicomweb_destination = web.get("destination")
    out.dimse = _dimse(_table(data.get("dimse", {}), f"{where}: [dimse]"), f"{where}: [dimse]")
    for door, name in (("[dicomweb]", out.dicomweb_destination), ("[dimse]", out.dimse.get("destination"))):
        if name is not None and name not in out.destinations:
            raise BadInputError(f"{where}: {door} destination '{name}' is not a [destination.NAME] table")
    return out


def _rule(entry: Any, where: str) -> Rule:
    entry = _table(entry, where)
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise BadInputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(_RULE_KEYS))}")
    refs = entry.get("adapters", [entry["adapter"]] if "adapter" in entry else [])
    if isinstance(refs, str):
        refs = [refs]
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise BadInputError(f"{where}: needs 'adapters' (a list of adapter references) or 'adapter'")
    task = entry.get("task")
    if task is not None and not isinstance(task, str):
        raise BadInputError(f"{where}: 'task' must be a string")
    conditions: dict[str, Any] = {}
    for key in CONDITIONS:
        if key not in entry:
            continue
        value = entry[key]
        if key == "series_description":
            try:
                conditions[key] = re.compile(str(value))
            except re.error as e:
                raise BadInputError(f"{where}: series_description is not a regular expression: {e}") from None
        else:
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise BadInputError(f"{where}: '{key}' must be a string or a list of strings")
            conditions[key] = tuple(_norm(key, v) for v in values)
    name = entry.get("name") or where.rsplit(": ", 1)[-1]
    return Rule(str(name), [Target(r.strip(), task) for r in refs], conditions)


def _code(value: Any, where: str) -> tuple[str, str, str]:
    if isinstance(value, str):  # a bare code value in the local scheme
        return value, LOCAL_SCHEME, value
    value = _table(value, where)
    if not isinstance(value.get("value"), str) or not value["value"] or len(value["value"]) > 64:
        raise BadInputError(f"{where}: needs 'value' (a code value, at most 64 characters)")
    scheme = value.get("scheme", LOCAL_SCHEME)
    meaning = value.get("meaning", value["value"])
    if not isinstance(scheme, str) or not isinstance(meaning, str) or len(scheme) > 16 or len(meaning) > 64:
        raise BadInputError(f"{where}: 'scheme' (at most 16 characters) and 'meaning' (64) must be strings")
    return value["value"], scheme, meaning


def _destination(name: str, d: Any, where: str) -> Destination:
    d = _table(d, where)
    if "dicomweb" in d:
        url = d["dicomweb"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadInputError(f"{where}: 'dicomweb' must be an http(s) URL (the service's DICOMweb root)")
        return Destination(name, dicomweb=url.rstrip("/"))
    ae, host, port = d.get("ae_title"), d.get("host"), d.get("port")
    if not (isinstance(ae, str) and isinstance(host, str) and isinstance(port, int)):
        raise BadInputError(f"{where}: needs either 'dicomweb' = URL, or 'ae_title', 'host' and 'port'")
    _check_ae(ae, f"{where}: ae_title")
    return Destination(name, ae_title=ae, host=host, port=port)


def _dimse(d: dict, where: str) -> dict:
    out: dict[str, Any] = {}
    if "ae_title" in d:
        out["ae_title"] = _check_ae(d["ae_title"], f"{where}: ae_title")
    if "port" in d:
        if not isinstance(d["port"], int) or not 0 <= d["port"] < 65536:
            raise BadInputError(f"{where}: 'port' must be a port number")
        out["port"] = d["port"]
    allow = d.get("allow", [])
    if not isinstance(allow, list):
        raise BadInputError(f"{where}: 'allow' must be a list of calling AE titles")
    out["allow"] = [_check_ae(a, f"{where}: allow") for a in allow]
    if "destination" in d:
        out["destination"] = str(d["destination"])
    return out


def _check_ae(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value.strip()) <= 16 or not value.isascii() or "\\" in value:
        raise BadInputError(f"{where}: an AE title is 1-16 ASCII characters, got {value!r}")
    return value.strip()


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise BadInputError(f"{where}: expected a table")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise BadInputError(f"{where}: expected an array of tables ([[rule]])")
    return value


def check_adapters(rules: Rules, resolve) -> None:
    """Every adapter the rules name resolves (`resolve`: the registry's); else a one-line error."""
    for ref in rules.adapters():
        try:
            resolve(ref)
        except Exception as e:  # AdapterNotFoundError, a malformed reference
            raise BadInputError(f"DICOM rules: adapter '{ref}' cannot be used: {' '.join(str(e).split())}") from None
