"""Where clients reach this server, for the absolute URLs in answers (`results_url`), behind a proxy too."""

from __future__ import annotations

import re

from starlette.requests import Request

_HOST = re.compile(r"[A-Za-z0-9._\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
_PREFIX = re.compile(r"(/[A-Za-z0-9._~\-]+)*/?")
_PORT = re.compile(r":\d+$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def server_url(request: Request, public_url: str | None) -> str:
    """`scheme://host[:port][/prefix]`, no trailing slash: the configured public URL, else what a reverse proxy
    says (X-Forwarded-Proto/-Host/-Port/-Prefix, or RFC 7239 `Forwarded`), else the Host the client used.

    Trusting the headers is safe here: the URL only goes back to the client whose request carried them.
    """
    if public_url:
        return public_url
    headers = request.headers
    forwarded = _forwarded(headers.get("forwarded"))
    proto = _first(headers.get("x-forwarded-proto")) or forwarded.get("proto") or request.url.scheme
    if proto not in _DEFAULT_PORTS:
        proto = request.url.scheme
    host = _first(headers.get("x-forwarded-host")) or forwarded.get("host") or headers.get("host") or ""
    if not _HOST.fullmatch(host):
        host = request.url.netloc
    port = _first(headers.get("x-forwarded-port"))
    has_port = _PORT.search(host) is not None and not host.endswith("]")
    if port and port.isdigit() and not has_port and port != _DEFAULT_PORTS[proto]:
        host = f"{host}:{port}"
    prefix = _first(headers.get("x-forwarded-prefix")) or str(request.scope.get("root_path", ""))
    if not _PREFIX.fullmatch(prefix):
        prefix = ""
    return f"{proto}://{host}{prefix.rstrip('/')}"


def _first(value: str | None) -> str | None:
    """The first of a comma-separated list: the proxy nearest the client wrote it."""
    return value.split(",")[0].strip() or None if value else None


def _forwarded(value: str | None) -> dict[str, str]:
    """The pairs of the first element of an RFC 7239 `Forwarded` header."""
    pairs: dict[str, str] = {}
    first = _first(value)
    for pair in (first or "").split(";"):
        name, _, text = pair.partition("=")
        if text:
            pairs[name.strip().lower()] = text.strip().strip('"')
    return pairs
