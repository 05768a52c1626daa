"""The explorer on the gateway's port: `GET /` is its page, `/static/` its stylesheet and ES modules
(service/http/explorer/), all with a strict security policy.

The page is plain HTML, CSS and ES modules: nothing is built and nothing is fetched from elsewhere, so it
works offline. The Content-Security-Policy allows scripts, styles and connections from this origin only
and no inline script or style attribute: even if a model's token text were ever inserted as HTML by
mistake, an `<img onerror>` or `<script>` in it could not run. `no-cache` makes browsers revalidate (by
ETag) so a server upgrade never serves a stale page.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

EXPLORER_DIR = Path(__file__).with_name("explorer")
STATIC_DIR = EXPLORER_DIR / "static"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


async def explorer_page(request: Request) -> Response:
    """GET / and HEAD /: the explorer's page."""
    return FileResponse(EXPLORER_DIR / "index.html", headers=SECURITY_HEADERS)


class ExplorerFiles(StaticFiles):
    """The files under /static/ with SECURITY_HEADERS on every answer."""

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        super().__init__(directory=directory)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response
