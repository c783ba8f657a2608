"""The inspector: ``GET /inspect``, one static page that shows what pruning kept and why.

The page is a client of the server's own ``/v1/chat/completions`` (the same API and ``pruning``
object every client gets), so it needs no second copy of the model. Its HTML, JS and CSS ship in
the package (``server/static/``): no CDN, no build step.

No API key guards these routes. vLLM 0.32's ``AuthenticationMiddleware`` checks only paths under
``/v1``, ``/v2``, ``/inference`` and ``/cohere``, so the page loads without one and the user types
the key into it; every call the page makes is under ``/v1`` and carries it as a bearer token. The
page holds no data of the server's, only code.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"
PAGE = "inspect.html"
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}

# Everything the page needs is its own; nothing may be fetched from elsewhere. Canvas drawing
# reads the user's images as data URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["inspector"])


@router.get("/inspect", include_in_schema=False)
async def inspect_page() -> FileResponse:
    return FileResponse(STATIC_DIR / PAGE, media_type="text/html", headers=HEADERS)


@router.get("/inspect/static/{name}", include_in_schema=False)
async def inspect_static(name: str) -> FileResponse:
    # Only the files shipped beside the page, by plain name: no paths, no dot files.
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(status_code=404, detail="Not Found")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
