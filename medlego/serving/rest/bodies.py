"""The OpenAPI request bodies of the REST routes that read their body themselves (after the token
check), which FastAPI cannot infer."""

from __future__ import annotations

from medlego.runtime.adapter_merge import METHODS


def _body(schemas: dict) -> dict:
    """An OpenAPI requestBody with one object schema per content type (FastAPI cannot infer these routes' bodies)."""
    content = {ctype: {"schema": {"type": "object", **schema}} for ctype, schema in schemas.items()}
    return {"requestBody": {"required": True, "content": content}}


_STR, _INT = {"type": "string"}, {"type": "integer", "minimum": 1}
_FILE = {"type": "string", "format": "binary"}

DIAGNOSE_BODY = _body({
    "multipart/form-data": {"required": ["file", "adapter"], "properties": {
        "file": {**_FILE, "description": "PNG, JPEG or DICOM file"},
        "adapter": {**_STR, "description": "name, name@version or alias"},
        "task": {**_STR, "description": "needed when the adapter has several tasks"}, "top_k": _INT}},
    "application/json": {"required": ["image", "adapter"], "properties": {
        "image": {"type": "string", "format": "byte", "description": "base64 PNG/JPEG/DICOM bytes"},
        "adapter": _STR, "task": _STR, "top_k": _INT}}})

BATCH_BODY = _body({
    "multipart/form-data": {"required": ["file", "adapter"], "properties": {
        "file": {"type": "array", "items": _FILE, "description": "one part per image"},
        "adapter": {"type": "array", "items": _STR, "description": "one adapter for every image, or one per image"},
        "task": {"type": "array", "items": _STR}, "top_k": _INT}},
    "application/json": {"required": ["items"], "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "image": {"type": "string", "format": "byte"}, "adapter": _STR, "task": _STR, "top_k": _INT}}},
        "adapter": {**_STR, "description": "default for items without one"}, "task": _STR, "top_k": _INT}}})

ALIAS_BODY = _body({"application/json": {"required": ["target"], "properties": {
    "target": {**_STR, "description": "NAME@VERSION, or NAME to follow its latest version"}}}})

MERGE_BODY = _body({"application/json": {"required": ["name", "sources"], "properties": {
    "name": {**_STR, "description": "name to register the merged adapter under"},
    "sources": {"type": "array", "items": _STR, "description": "registered NAME[@VERSION] or aliases"},
    "method": {**_STR, "default": "med-lego", "enum": list(METHODS), "description": ", ".join(METHODS)},
    "params": {"type": "object", "description": "method parameters, e.g. {\"threshold\": 0.997}"},
    "aliases": {"type": "array", "items": _STR}, "task_names": {"type": "array", "items": _STR},
    "move_alias": {"type": "boolean", "description": "move an alias that points elsewhere"}}}})

UPLOAD_BODY = _body({
    "multipart/form-data": {"required": ["file", "name"], "properties": {
        "file": {**_FILE, "description": "medlego SVD-LoRA .safetensors"}, "name": _STR,
        "alias": {"type": "array", "items": _STR},
        "move_alias": {"type": "boolean", "description": "move an alias that points elsewhere"}}}})
