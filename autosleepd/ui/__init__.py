"""The live page at /autosleepd/: static files shipped in the package (no build step, no CDN),
which poll ``GET /autosleepd/host`` and call the admin endpoints with the token the user gives
(kept in the tab's sessionStorage only)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
# Everything the page loads comes from here: nothing from elsewhere, no inline script.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def add_page_routes(app: web.Application) -> None:
    """Before the admin routes, whose catch-all answers 404 for the rest of /autosleepd/."""
    app.router.add_get("/autosleepd", _redirect)
    app.router.add_get("/autosleepd/", _page)
    app.router.add_get("/autosleepd/ui/{name}", _file)


async def _redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPPermanentRedirect("/autosleepd/")


async def _page(request: web.Request) -> web.Response:
    return _serve("index.html")


async def _file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound(text=f"no such file: {name[:100]}")
    return _serve(name)


def _serve(name: str) -> web.Response:
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=_FILES[name], charset="utf-8", headers=_HEADERS)
