"""/docs works without the internet: the page and everything it loads come from the server itself."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

import servers

EXTERNAL = re.compile(r"""(?:https?:)?//[^\s"'<>)]+""")


@pytest.fixture(scope="module")
def url(tiny_base_file, tmp_path_factory):
    srv = servers.start_server(tiny_base_file, tmp_path_factory.mktemp("docs"))
    yield srv.url
    srv.stop()


def _references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + \
        re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)  # the OpenAPI document SwaggerUIBundle loads


def test_docs_page_and_every_asset_come_from_the_server(url):
    page = httpx.get(url + "/docs", timeout=30)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert EXTERNAL.findall(page.text) == []  # no CDN, no public validator, no favicon from elsewhere
    refs = _references(page.text)
    assert len(refs) == 4, refs  # styles, icon, script, the OpenAPI document
    for ref in refs:
        target = urljoin(url + "/docs", ref)
        assert urlsplit(target).netloc == urlsplit(url).netloc, ref
        r = httpx.get(target, timeout=30)
        assert r.status_code == 200 and r.content, (ref, r.status_code)
        if ref.endswith(".css"):  # styles may load further files: only inline data
            assert all(u.strip("'\" ").startswith("data:") for u in re.findall(r"url\(([^)]*)\)", r.text))
        if ref.endswith(".js"):
            assert "SwaggerUIBundle" in r.text and r.headers["content-type"].startswith("text/javascript")
    assert '"openapi":"3.1' in httpx.get(url + "/openapi.json", timeout=30).text.replace(" ", "")


def test_only_the_page_s_own_assets_are_served(url):
    assert httpx.get(url + "/docs/assets/index.html", timeout=30).status_code == 404  # it would load a public demo API
    assert httpx.get(url + "/docs/assets/..%2Fserver.py", timeout=30).status_code == 404
    assert httpx.get(url + "/redoc", timeout=30).status_code == 404  # ReDoc would need a CDN


def test_the_openapi_document_covers_v1_and_v2(url):
    """The Open Inference Protocol routes (mounted at /v2) are in /openapi.json beside /v1, with every
    merge method the server knows."""
    from medlego.runtime.adapter_merge import METHODS

    doc = httpx.get(url + "/openapi.json", timeout=30).json()
    paths = doc["paths"]
    for path in ("/v1/diagnose", "/v1/adapters", "/v2", "/v2/health/live", "/v2/health/ready",
                 "/v2/models/{model}", "/v2/models/{model}/ready", "/v2/models/{model}/infer",
                 "/v2/models/{model}/versions/{version}/infer"):
        assert path in paths, (path, sorted(paths))
    assert "requestBody" in paths["/v2/models/{model}/infer"]["post"]
    merge = paths["/v1/merge"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(merge["properties"]["method"]["enum"]) == set(METHODS)
