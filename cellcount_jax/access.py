"""Who may use the annotation server: its Host names, its token, and same-origin edits.

As Jupyter's server does, every request passes three checks before any handler runs:

1. Host: the request's `Host` header names a loopback name or address (localhost,
   127.0.0.0/8, ::1), the address served on, or a name the user allows (`--allow-host`;
   `*` allows any). Anything else is answered 403: a page that rebinds its own DNS name to
   127.0.0.1 (DNS rebinding) cannot reach the server under that name.
2. Origin: a state-changing request (POST, PUT, DELETE) whose `Origin` is not the server's
   own (scheme-less host:port as the browser addressed it), or whose `Sec-Fetch-Site` says
   cross-site, is answered 403.
3. Token: a secret generated per start (`secrets.token_urlsafe`), or given by `--token` or
   the CELLCOUNT_TOKEN environment variable, printed in the page's URL
   (`http://localhost:8765/?token=...`). The page loaded with it gets it as an HttpOnly,
   SameSite=Strict cookie (named after the port, so that two servers on one machine keep
   theirs) and keeps it in memory for its requests (`Authorization: token ...`). The page
   and every API request without the token (query `token=`, the header or the cookie) are
   answered 401. Tokens are compared in constant time (`hmac.compare_digest`). The static
   files (the page's script and style, the same for everyone) need no token.
"""
import hmac
import ipaddress
import os
import secrets
import socket
from typing import Iterable, Optional
from urllib.parse import urlsplit

from cellcount_jax.errors import InputError

TOKEN_ENV = "CELLCOUNT_TOKEN"
STATE_CHANGING = ("POST", "PUT", "DELETE", "PATCH")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """A loopback name or address: localhost (and *.localhost), 127.0.0.0/8, ::1."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostname(host_header: str) -> str:
    """The name or address of a Host header, without its port: 'a.b:80' -> 'a.b',
    '[::1]:80' -> '::1', '::1' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> frozenset:
    """The names a Host header may give besides loopback ones: the address served on (for a
    wildcard address, this machine's name, its fully qualified name and their addresses)
    and `extra` ('*': any)."""
    names = {hostname(h) for h in extra if h.strip()}
    if host in WILDCARD_ADDRESSES:
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names.update(a[4][0].lower() for a in socket.getaddrinfo(name, None))
            except OSError:
                pass
    else:
        names.add(hostname(host) if not host.count(":") > 1 else host.strip("[]").lower())
    return frozenset(names)


def resolve_token(token: Optional[str], required: bool, host: str) -> Optional[str]:
    """The server's token: `token`, else $CELLCOUNT_TOKEN, else a new random one; None where
    `required` is False, which only a loopback `host` may have."""
    if not required:
        if not is_loopback(host):
            raise InputError(f"--no-token serves without a token, which only a loopback "
                             f"--host (127.0.0.1, localhost, ::1) may do; {host!r} is "
                             f"reachable from other machines")
        if token:
            raise InputError("--token and --no-token contradict each other")
        return None
    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)
    if len(token) < 8 or any(c.isspace() or c in ";,\"" for c in token):
        raise InputError("a token must be at least 8 characters without spaces, commas, "
                         "semicolons or quotes")
    return token


def cookie_name(host_header: str) -> str:
    """The cookie holding the token, named after the port the browser addressed (cookies
    are shared between the ports of a host)."""
    port = host_header.rsplit(":", 1)[-1] if "]" not in host_header.rsplit(":", 1)[-1] else ""
    return "cellcount-token-" + "".join(c for c in port if c.isdigit())


def same(a: Optional[str], b: Optional[str]) -> bool:
    """Constant-time equality of two tokens (False where either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


def install(app, token: Optional[str], host: str, extra_hosts: Iterable[str] = ()):
    """Adds the three checks of the module docstring to a Flask `app` served on `host`, and
    the cookie to the page's answer when it was loaded with the token."""
    from flask import request
    from werkzeug.exceptions import Forbidden, Unauthorized

    names = allowed_hosts(host, extra_hosts)
    any_host = "*" in names

    def presented():
        auth = request.headers.get("Authorization", "")
        if auth[:6].lower() == "token ":
            return auth[6:].strip()
        return request.args.get("token") or request.cookies.get(cookie_name(request.host))

    @app.before_request
    def check():
        name = hostname(request.host or "")
        if not (any_host or is_loopback(name) or name in names):
            raise Forbidden(f"Host {request.host!r} is not this server's: open it as "
                            f"http://localhost:PORT/ (an SSH tunnel), or start it with "
                            f"--allow-host={name}")
        if request.method in STATE_CHANGING:
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
                raise Forbidden(f"a request from another site (Origin {origin!r}) may not "
                                f"change the annotations")
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                raise Forbidden("a request from another site may not change the annotations")
        if token is None or request.path.startswith("/static/"):
            return None
        if not same(presented(), token):
            raise Unauthorized("this server needs its token: open the URL that `cellcount "
                               "annotate` printed (http://...:PORT/?token=...)")
        return None

    @app.after_request
    def remember(response):
        if token is not None and request.path == "/" and same(request.args.get("token"),
                                                              token):
            response.set_cookie(cookie_name(request.host), token, httponly=True,
                                samesite="Strict", path="/")
        return response
