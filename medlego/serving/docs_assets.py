"""The OpenAPI page at /docs, working without the internet.

FastAPI's own page loads Swagger UI's script, styles and icon from public CDNs, so in a hospital
network without internet access it is a blank page. Here the same Swagger UI comes from a pip
package (``swagger-ui-bundle-v2``: Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI writes)
and the app serves its three files itself. ReDoc has no such package, so /redoc is not offered.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# the only files the page uses, and their types (nothing else of the package is served)
_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def add_offline_docs(app: FastAPI) -> None:
    """Serve the Swagger UI page at /docs from local files (create the app with docs_url=None)."""
    from swagger_ui_bundle import swagger_ui_path

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            # the default validator is a public service the page would call for its badge
            swagger_ui_parameters={"validatorUrl": None})

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in _ASSETS:
            raise HTTPException(404, f"no docs asset '{name}'")
        return FileResponse(swagger_ui_path / name, media_type=_ASSETS[name],
                            headers={"Cache-Control": "public, max-age=86400"})
