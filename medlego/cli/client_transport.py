"""The two ways `medlego client` talks to a server, REST (httpx) and gRPC, behind one interface whose
answers are the REST API's JSON shapes, so the command prints the same thing whichever is used.

A server's refusal becomes a MedlegoError with the server's one-line message (over REST, of the
class the server named), so the CLI prints it as its own one line and exits 2.
"""

from __future__ import annotations

import json

from medlego.runtime.errors import BadInputError, MedlegoError, error_class


class HttpClient:
    def __init__(self, url: str, api_token: str | None, admin_token: str | None, timeout_s: float):
        import httpx

        self.url = url.rstrip("/")
        self._tokens = {"api": api_token, "admin": admin_token}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)

    def _call(self, method: str, path: str, who: str = "api", **kwargs) -> dict:
        import httpx

        token = self._tokens[who]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            r = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as e:
            raise BadInputError(f"cannot reach {self.url}: {e or type(e).__name__} (is `medlego serve` running there?)") from None
        try:
            body = r.json()
        except ValueError:
            body = {"detail": r.text.strip()[:200] or r.reason_phrase}
        if r.status_code >= 400 and not (path == "/readyz" and r.status_code == 503):
            cls = error_class(body.get("type", "")) if isinstance(body, dict) else None
            raise (cls or MedlegoError)(f"HTTP {r.status_code}: {body.get('detail') if isinstance(body, dict) else body}")
        return body

    def diagnose(self, adapter: str, task: str | None, top_k: int | None, name: str, image: bytes) -> dict:
        fields = {"adapter": adapter, **({"task": task} if task else {}), **({"top_k": str(top_k)} if top_k else {})}
        return self._call("POST", "/v1/diagnose", files={"file": (name, image)}, data=fields)

    def list(self, limit: int | None = None, cursor: str | None = None, prefix: str | None = None,
             task: str | None = None, base: str | None = None) -> dict:
        """One page: {"adapters", "aliases", "next_cursor" (absent on the last page)}."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("prefix", prefix), ("task", task),
                                    ("base", base)) if v is not None}
        return self._call("GET", "/v1/adapters", params=params)

    def describe(self, ref: str) -> dict:
        return self._call("GET", f"/v1/adapters/{ref}")

    def health(self) -> dict:
        return self._call("GET", "/readyz")

    def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool) -> dict:
        fields = {"name": name, "alias": aliases, **({"move_alias": "true"} if move_aliases else {})}
        return self._call("POST", "/v1/adapters", "admin", files={"file": (f"{name}.safetensors", data)}, data=fields)

    def pin(self, ref: str, pinned: bool) -> dict:
        return self._call("POST", f"/v1/adapters/{ref}/{'pin' if pinned else 'unpin'}", "admin")

    def delete(self, ref: str, all_versions: bool) -> dict:
        return self._call("DELETE", f"/v1/adapters/{ref}", "admin", params={"all_versions": str(all_versions).lower()})


class GrpcClient:
    def __init__(self, target: str, api_token: str | None, admin_token: str | None, timeout_s: float):
        import grpc

        from medlego.serving import medlego_pb2_grpc as pb_grpc

        self.target = target
        self._tokens = {"api": api_token, "admin": admin_token}
        self._timeout = timeout_s
        self._stub = pb_grpc.MedlegoStub(grpc.insecure_channel(target))

    def _call(self, rpc: str, request, who: str = "api"):
        import grpc

        token = self._tokens[who]
        try:
            return getattr(self._stub, rpc)(request, timeout=self._timeout,
                                            metadata=[("authorization", f"Bearer {token}")] if token else None)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]  # a failed call is a grpc.Call too
            if code == grpc.StatusCode.UNAVAILABLE:
                raise BadInputError(f"cannot reach {self.target}: {details} (is `medlego serve` running there?)") from None
            raise MedlegoError(f"{code.name}: {details}") from None

    def diagnose(self, adapter: str, task: str | None, top_k: int | None, name: str, image: bytes) -> dict:
        from medlego.serving import medlego_pb2 as pb

        d = self._call("Diagnose", pb.DiagnoseRequest(adapter=adapter, task=task or "", image=image, top_k=top_k or 0))
        return {"adapter": d.adapter, "version": d.version, "sha256": d.sha256, "task": d.task,
                "multilabel": d.multilabel, "probabilities": dict(sorted(d.probabilities.items())),
                "top": [{"label": t.label, "probability": t.probability} for t in d.top],
                "timings_ms": dict(d.timings_ms)}

    def list(self, limit: int | None = None, cursor: str | None = None, prefix: str | None = None,
             task: str | None = None, base: str | None = None) -> dict:
        from medlego.serving import medlego_pb2 as pb

        if limit is not None and not 1 <= limit <= 2**32 - 1:  # protobuf's uint32 would refuse it less clearly
            raise BadInputError(f"bad limit {limit}: a page holds 1 to 1000 adapters")
        r = self._call("ListAdapters", pb.ListAdaptersRequest(limit=limit or 0, cursor=cursor or "", prefix=prefix or "",
                                                              task=task or "", base=base or ""))
        page = {"adapters": [_adapter_json(a) for a in r.adapters], "aliases": dict(r.aliases)}
        return {**page, "next_cursor": r.next_cursor} if r.next_cursor else page

    def describe(self, ref: str) -> dict:
        from medlego.serving import medlego_pb2 as pb

        return _adapter_json(self._call("DescribeAdapter", pb.DescribeAdapterRequest(ref=ref)))

    def health(self) -> dict:
        from medlego.serving import medlego_pb2 as pb

        h = self._call("Health", pb.HealthRequest())
        return {"alive": h.alive, "ready": h.ready, "adapters": h.adapters, "device": h.device}

    def register(self, name: str, data: bytes, aliases: list[str], move_aliases: bool) -> dict:
        from medlego.serving import medlego_pb2 as pb

        request = pb.RegisterAdapterRequest(name=name, data=data, aliases=aliases, move_aliases=move_aliases)
        return _adapter_json(self._call("RegisterAdapter", request, "admin"))

    def pin(self, ref: str, pinned: bool) -> dict:
        from medlego.serving import medlego_pb2 as pb

        return _adapter_json(self._call("PinAdapter" if pinned else "UnpinAdapter", pb.DescribeAdapterRequest(ref=ref),
                                        "admin"))

    def delete(self, ref: str, all_versions: bool) -> dict:
        from medlego.serving import medlego_pb2 as pb

        r = self._call("DeleteAdapter", pb.DeleteAdapterRequest(ref=ref, all_versions=all_versions), "admin")
        return {"deleted": list(r.deleted)}


def _adapter_json(a) -> dict:
    """An AdapterInfo as the REST API writes it (metadata_json spread into the object)."""
    return {"name": a.name, "version": a.version, "ref": a.ref, "sha256": a.sha256, "size": a.size,
            "created": a.created, "pinned": a.pinned, "aliases": list(a.aliases), "max_rank": a.max_rank,
            "tasks": [{"name": t.name, "labels": list(t.labels), "multilabel": t.multilabel} for t in a.tasks],
            **(json.loads(a.metadata_json) if a.metadata_json else {})}
