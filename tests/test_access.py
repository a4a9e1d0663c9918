"""Who may use the annotation server (`access`): Host names, the token, same-origin edits, and
the server's limits, through Flask's client and the real `cellcount annotate` on 127.0.0.1."""
import hmac
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cellcount_jax import access
from cellcount_jax.data import io
from cellcount_jax.errors import InputError

pytest.importorskip("flask")

TOKEN = "s3cret-token-for-tests"
EDITS = [("post", "/api/points", {"coords": [3, 4]}),
         ("put", "/api/points/0", {"coords": [5, 6]}),
         ("delete", "/api/points/0", None),
         ("post", "/api/accept", {"points": [[7, 8]]}),
         ("post", "/api/undo", None),
         ("post", "/api/redo", None),
         ("post", "/api/review", {"region": [0, 0]}),
         ("post", "/api/propose", {"box": [[0, 0], [20, 20]]})]
READS = [("get", "/api/info", None), ("get", "/api/points", None),
         ("get", "/api/view?y0=0&y1=8&x0=0&x1=8", None)]


@pytest.fixture
def image(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    path = tmp_path / "cells.png"
    Image.fromarray((rng.random((40, 48)) * 200).astype(np.uint8)).save(path)
    return str(path)


def _app(image, **kwargs):
    from cellcount_jax import annotate
    points = os.path.splitext(image)[0] + ".csv"
    kwargs.setdefault("token", TOKEN)
    return annotate.create_app(image, points, 2, **kwargs), points


def _send(client, method, url, body, **headers):
    kwargs = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    return getattr(client, method)(url, **kwargs)


def _rows(points):
    return io.read_dots_csv(points, 2).tolist() if os.path.exists(points) else []


def test_a_foreign_host_header_is_refused_before_any_handler(image):
    app, points = _app(image)
    client = app.test_client()
    auth = {"Authorization": f"token {TOKEN}"}
    for method, url, body in [("get", "/", None)] + READS + EDITS:
        r = _send(client, method, url, body, Host="evil.example:8765", **auth)
        assert r.status_code == 403, (method, url)
        assert b"evil.example" in r.data and b"--allow-host" in r.data
    assert _rows(points) == []  # no edit landed
    for host in ("localhost:8765", "127.0.0.1:8765", "[::1]:8765", "127.0.0.2", "LOCALHOST",
                 "app.localhost:80"):
        assert _send(client, "get", "/api/info", None, Host=host, **auth).status_code == 200, host


def test_allowed_names_the_served_address_and_the_wildcard(image):
    client = _app(image, host="10.1.2.3", allow_hosts=["node7.cluster", "Login:22"])[0].test_client()
    auth = {"Authorization": f"token {TOKEN}"}
    for host, code in [("10.1.2.3:8765", 200), ("node7.cluster:8765", 200), ("login", 200),
                       ("node8.cluster:8765", 403), ("10.1.2.4:8765", 403)]:
        assert _send(client, "get", "/api/info", None, Host=host, **auth).status_code == code, host
    anyone = _app(image, host="10.1.2.3", allow_hosts=["*"])[0].test_client()
    assert _send(anyone, "get", "/api/info", None, Host="a.b:1", **auth).status_code == 200
    # Without the token, even an allowed name gets nothing.
    assert _send(anyone, "get", "/api/info", None, Host="a.b:1").status_code == 401


def test_every_request_needs_the_token_or_its_cookie(image):
    app, points = _app(image)
    client = app.test_client()
    for method, url, body in [("get", "/", None)] + READS + EDITS:
        for headers in ({}, {"Authorization": "token wrong-token-123"},
                        {"Authorization": f"token {TOKEN}x"}, {"Authorization": TOKEN}):
            r = _send(client, method, url, body, **headers)
            assert r.status_code == 401, (method, url, headers)
        r = _send(client, method, url + ("&" if "?" in url else "?") + "token=nope", body)
        assert r.status_code == 401
    assert _rows(points) == []
    assert "token" in client.get("/api/info").get_json()["error"]
    # The page's script and style are the same for everyone.
    assert client.get("/static/app.js").status_code == 200
    # The right token, in the header or the query, opens everything.
    assert _send(client, "post", "/api/points", {"coords": [1, 2]},
                 Authorization=f"token {TOKEN}").status_code == 200
    assert client.get(f"/api/points?token={TOKEN}").get_json()["points"][0]["coords"] == [1, 2]


def test_the_page_loaded_with_the_token_sets_a_strict_httponly_cookie(image):
    app, points = _app(image)
    client = app.test_client()
    page = client.get(f"/?token={TOKEN}", headers={"Host": "localhost:8765"})
    assert page.status_code == 200 and b"/static/app.js" in page.data
    cookie = page.headers["Set-Cookie"]
    assert cookie.startswith(f"cellcount-token-8765={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    # The cookie alone (as the browser sends it) is enough, on the same port.
    r = client.post("/api/points", json={"coords": [2, 3]}, headers={"Host": "localhost:8765"})
    assert r.status_code == 200 and _rows(points) == [[2, 3]]
    assert client.get("/", headers={"Host": "localhost:8765"}).status_code == 200
    # Cookies are shared between ports: another server's port has its own cookie name.
    assert client.get("/api/info", headers={"Host": "localhost:9999"}).status_code == 401
    # No cookie is set without the right token, nor on API answers.
    fresh = app.test_client()
    assert "Set-Cookie" not in fresh.get("/?token=bad").headers
    assert "Set-Cookie" not in fresh.get(f"/api/info?token={TOKEN}").headers


def test_a_foreign_origin_may_not_change_anything(image):
    app, points = _app(image)
    client = app.test_client()
    auth = {"Authorization": f"token {TOKEN}", "Host": "127.0.0.1:8765"}
    client.post("/api/points", json={"coords": [9, 9]}, headers=auth)
    before = _rows(points)
    for method, url, body in EDITS:
        for origin in ("http://evil.example", "http://127.0.0.1:9999", "null",
                       "http://localhost:8765"):  # another origin, though the same machine
            r = _send(client, method, url, body, Origin=origin, **auth)
            assert r.status_code == 403, (method, url, origin)
            assert "another site" in r.get_json()["error"]
        r = _send(client, method, url, body, **{"Sec-Fetch-Site": "cross-site"}, **auth)
        assert r.status_code == 403
    assert _rows(points) == before
    # The page's own origin edits.
    r = _send(client, "post", "/api/points", {"coords": [1, 1]}, Origin="http://127.0.0.1:8765",
              **{"Sec-Fetch-Site": "same-origin"}, **auth)
    assert r.status_code == 200 and len(_rows(points)) == 2
    # Reads are not edits: an Origin header on a GET changes nothing.
    assert _send(client, "get", "/api/info", None, Origin="http://evil.example",
                 **auth).status_code == 200


def test_limits_answer_4xx_with_their_reason(image, monkeypatch):
    from cellcount_jax import annotate, proposals
    monkeypatch.setattr(annotate, "MAX_ACCEPT", 10)
    app, points = _app(image)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"token {TOKEN}"
    big = b'{"coords": [1, 2], "pad": "' + b"x" * annotate.MAX_BODY + b'"}'
    r = client.post("/api/points", data=big, content_type="application/json")
    assert r.status_code == 413 and str(annotate.MAX_BODY) in r.get_json()["error"]
    r = client.post("/api/accept", json={"points": [[1, 1]] * 11})
    assert r.status_code == 413 and "at most 10" in r.get_json()["error"]
    assert _rows(points) == []
    assert client.post("/api/accept", json={"points": [[1, 1]] * 10}).status_code == 200

    # A slow proposal: 422 when the time is up, 429 while it still runs, then answers again.
    release = threading.Event()
    slow = proposals.propose

    def waiting(*args, **kwargs):
        release.wait(30)
        return slow(*args, **kwargs)

    monkeypatch.setattr(proposals, "propose", waiting)
    client = _app(image, propose_seconds=0.3)[0].test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"token {TOKEN}"
    box = {"box": [[0, 0], [40, 48]]}
    t0 = time.perf_counter()
    r = client.post("/api/propose", json=box)
    assert r.status_code == 422 and "longer than 0.3 s" in r.get_json()["error"]
    assert time.perf_counter() - t0 < 5
    r = client.post("/api/propose", json=box)
    assert r.status_code == 429 and "still being computed" in r.get_json()["error"]
    assert client.get("/api/info").status_code == 200  # the server answers meanwhile
    release.set()
    for _ in range(100):
        r = client.post("/api/propose", json=box)
        if r.status_code != 429:
            break
        time.sleep(0.05)
    assert r.status_code == 200 and "detector" in r.get_json()["points"]


def test_the_token_s_origin_and_checks(monkeypatch):
    monkeypatch.delenv(access.TOKEN_ENV, raising=False)
    a, b = access.resolve_token(None, True, "127.0.0.1"), access.resolve_token(None, True, "::1")
    assert a != b and len(a) >= 40  # new, random, 32 bytes
    monkeypatch.setenv(access.TOKEN_ENV, "from-the-environment")
    assert access.resolve_token(None, True, "0.0.0.0") == "from-the-environment"
    assert access.resolve_token("given-on-the-line", True, "0.0.0.0") == "given-on-the-line"
    assert access.resolve_token(None, False, "localhost") is None
    for host in ("0.0.0.0", "10.0.0.5", "node7", "::"):
        with pytest.raises(InputError, match="loopback"):
            access.resolve_token(None, False, host)
    for bad in ("short", "has space in it", "semi;colon-token"):
        with pytest.raises(InputError, match="at least 8"):
            access.resolve_token(bad, True, "127.0.0.1")
    # Compared in constant time.
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    assert access.same("abcdefgh", "abcdefgh") and not access.same("abcdefgh", "abcdefgX")
    assert not access.same(None, "abcdefgh") and len(calls) == 2
    assert [access.hostname(h) for h in ("A.b:80", "[::1]:8765", "::1", "host")] == \
        ["a.b", "::1", "::1", "host"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port, method, path, host=None, body=None, **headers):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host or f"127.0.0.1:{port}", **headers}
    if body is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(body)
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Set-Cookie"), data


def _start(image, *flags, env=None):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from cellcount_jax.cli import main; main()", "annotate", image,
         f"--port={port}", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})})
    line = proc.stdout.readline() + proc.stdout.readline()
    return proc, port, line


def test_the_real_server_prints_its_token_and_guards_every_door(image):
    proc, port, printed = _start(image, "--allow-host=node7.cluster")
    try:
        url = re.search(r"open (http://\S+)", printed).group(1)
        token = re.search(r"\?token=(\S+)$", url).group(1)
        assert url == f"http://localhost:{port}/?token={token}" and len(token) >= 40
        assert _request(port, "GET", "/api/info")[0] == 401
        assert _request(port, "GET", f"/?token={token}", host="evil.example")[0] == 403
        status, cookie, page = _request(port, "GET", f"/?token={token}")
        assert status == 200 and b"app.js" in page and "HttpOnly" in cookie
        jar = cookie.split(";")[0]
        assert _request(port, "GET", "/api/info", Cookie=jar)[0] == 200
        assert _request(port, "GET", "/api/info", host=f"node7.cluster:{port}", Cookie=jar)[0] == 200
        assert _request(port, "POST", "/api/points", body={"coords": [1, 1]}, Cookie=jar,
                        Origin="http://evil.example")[0] == 403
        assert _request(port, "POST", "/api/points", body={"coords": [1, 1]},
                        Authorization=f"token {token}", Origin=f"http://127.0.0.1:{port}")[0] == 200
        big = {"points": [[1, 1]]}
        status, _, data = _request(port, "POST", "/api/accept", Cookie=jar,
                                   body={**big, "pad": "x" * (16 * 2 ** 20)})
        assert status == 413 and b"at most" in data
        assert _rows(os.path.splitext(image)[0] + ".csv") == [[1, 1]]
    finally:
        proc.kill()
        proc.wait()
    # The token from the environment; no token at all only on a loopback address.
    proc, port, printed = _start(image, env={access.TOKEN_ENV: "env-token-123"})
    try:
        assert "/?token=env-token-123 " in printed
        assert _request(port, "GET", "/api/info", Authorization="token env-token-123")[0] == 200
    finally:
        proc.kill()
        proc.wait()
    proc, port, printed = _start(image, "--no-token")
    try:
        assert "token" not in printed and _request(port, "GET", "/api/info")[0] == 200
        assert _request(port, "GET", "/api/info", host="evil.example")[0] == 403
    finally:
        proc.kill()
        proc.wait()
    out = subprocess.run([sys.executable, "-c", "from cellcount_jax.cli import main; main()",
                          "annotate", image, "--host=0.0.0.0", "--no-token"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "loopback" in out.stderr and out.stderr.count("\n") == 1
