"""A small client of SciDB's shim, the HTTP service SciDB's own Python and R clients
speak (SciDB-Py cannot be imported beside NumPy 2, so this engine speaks it itself).

The protocol, as shim 19.11 implements it (Paradigm4/shim src/shim.c, docs_gen/help.Rmd):
- `/new_session[?user=&password=]` -> a session id (text). One session holds one upload
  file and one saved output, each replaced by the next upload or saving query.
- `POST /upload?id=` with the raw bytes as the body (Content-Length required) -> the
  server-side path of the session's upload file, for `input(<schema>, 'path', ...)`.
- `/execute_query?id=&query=[&save=FORMAT]` -> blocks until the query ends; the SciDB
  query id (text). With `save`, the result goes to the session's output file.
- `/read_bytes?id=&n=0` -> the whole saved output (binary formats).
- `/cancel?id=` -> cancels the session's running query; `/release_session?id=` ends it.
- Any other status than 200 is an error whose body is a short text: 406 carries SciDB's
  own error text (the session survives), 404 a lost session, 500 a shim failure (the
  session is left to the client to release), 502 a lost SciDB connection (shim ends the
  session itself), 503 no free session slot, 401 refused credentials (or an HTTP digest
  challenge when shim's .htpasswd is set).
Every reply is turned into a value or one line naming the server: a `ShimError`, or
EngineUnavailable where the server cannot go on (unreachable, a dropped connection, 502).
A session lost (404) or broken (500) is opened again by the next call.
"""
from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from pipelines.errors import EngineUnavailable

# what each status means, for the one-line error (shim 19.11's own words are the body)
STATUS = {400: "bad request", 401: "authentication refused", 404: "session lost",
          406: "query failed", 409: "no query to cancel", 410: "no output saved",
          416: "output saved in another format", 500: "shim failed (session ended)",
          502: "SciDB connection lost (session ended)", 503: "no free shim session"}


def headline(text: str) -> str:
    """The line of shim's (or SciDB's) error text a user can act on: SciDB's first line
    only names the C++ file that threw, so its "Error description:" line, else its
    "Error id:" line, else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for mark in ("Error description:", "Error id:"):
        for line in lines:
            if line.startswith(mark):
                return line[:300]
    return lines[0][:300] if lines else ""


class ShimError(RuntimeError):
    """A reply other than 200: `status`, shim's (or SciDB's) text, and its `headline`."""

    def __init__(self, url: str, endpoint: str, status: int, text: str):
        what = STATUS.get(status, "unexpected reply")
        self.status, self.text, self.headline = status, text, headline(text)
        super().__init__(f"SciDB at {url}: {endpoint}: {what} (HTTP {status})"
                         + (f": {self.headline}" if self.headline else ""))


@dataclass
class Shim:
    """One shim session. `url`: http(s)://host:port of shim (8080 http, 8083 https by
    default); `user`/`password`: SciDB's own credentials, if it asks; `http_user` /
    `http_password`: shim's HTTP digest credentials, if its .htpasswd is set."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log or traceback
    http_user: str | None = None
    http_password: str | None = field(default=None, repr=False)
    timeout: float = 60.0  # every call but a query, which blocks as long as it runs
    session: str | None = None

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        handlers = []
        if self.http_user:
            passwords = urllib.request.HTTPPasswordMgrWithDefaultRealm()
            passwords.add_password(None, self.url, self.http_user, self.http_password or "")
            handlers.append(urllib.request.HTTPDigestAuthHandler(passwords))
        self._opener = urllib.request.build_opener(*handlers)

    # -- one request ------------------------------------------------------------------
    def _call(self, endpoint: str, params: dict | None = None, body: bytes | None = None,
              timeout: float | None = -1.0) -> bytes:
        """One request; `timeout` in seconds, None for none, -1 for the client's."""
        timeout = self.timeout if timeout == -1.0 else timeout
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items()
                                        if v is not None})  # '+' -> %2B, as shim needs
        request = urllib.request.Request(f"{self.url}/{endpoint}" + (f"?{query}" if query
                                                                    else ""),
                                         data=body, method="POST" if body is not None
                                         else "GET")
        try:
            try:
                with self._opener.open(request, timeout=timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as exc:  # its text can be cut short too
                error = ShimError(self.url, endpoint, exc.code,
                                  exc.read().decode("utf-8", "replace"))
        except urllib.error.URLError as exc:  # refused, no such host, connect timed out
            raise EngineUnavailable(f"SciDB at {self.url}: unreachable ({exc.reason})") \
                from None
        except (http.client.HTTPException, OSError) as exc:  # dropped or cut mid-reply
            raise EngineUnavailable(f"SciDB at {self.url}: connection lost during "
                                    f"{endpoint} ({exc!r:.200})") from None
        if error.status == 502:  # shim ended the session: SciDB itself is gone
            self.session = None
            raise EngineUnavailable(str(error)) from None
        if error.status in (404, 500) and endpoint != "release_session":
            self._end_session(release=error.status == 500)  # the next call opens one
        raise error from None

    # -- the protocol -----------------------------------------------------------------
    def version(self) -> str:
        return self._call("version", timeout=10).decode().strip()

    def open(self) -> "Shim":
        text = self._call("new_session", {"user": self.user, "password": self.password},
                          timeout=30)
        self.session = text.decode().strip()
        if not self.session:
            raise ShimError(self.url, "new_session", 200, "an empty session id")
        return self

    def _session(self) -> str:
        """The session's id, opening one first if there is none (a 404 or 500 ended it)."""
        if self.session is None:
            self.open()
        return self.session

    def execute(self, query: str, save: str | None = None, retry: bool = True,
                timeout: float | None = None) -> str:
        """Run one AFL query; with `save`, its result is kept for `read_bytes`. It blocks
        as long as the query runs (shim answers when it ends: no `timeout` by default),
        and a Ctrl-C asks shim to cancel it on the server. Returns SciDB's query id. A
        lost session (404: shim reaped it; SciDB ran nothing of the query) is opened again
        once and the query retried, unless `retry` is False (a query that reads the
        session's upload)."""
        for attempt in (1, 2):
            params = {"id": self._session(), "query": query, "save": save}
            try:
                return self._call("execute_query", params, timeout=timeout).decode().strip()
            except KeyboardInterrupt:
                try:
                    self.cancel()  # the query would run on in the server otherwise
                except (ShimError, EngineUnavailable):
                    pass
                raise
            except ShimError as exc:
                if exc.status != 404 or not retry or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def upload(self, data: bytes) -> str:
        """Send bytes to the session's upload file; returns its path on the server (the
        next upload replaces it)."""
        return self._call("upload", {"id": self._session()}, body=data).decode().strip()

    def read_bytes(self) -> bytes:
        return self._call("read_bytes", {"id": self._session(), "n": 0})

    def cancel(self) -> None:
        if self.session is not None:
            try:
                self._call("cancel", {"id": self.session}, timeout=30)
            except ShimError as exc:
                if exc.status != 409:  # nothing running: nothing to cancel
                    raise

    def _end_session(self, release: bool) -> None:
        session, self.session = self.session, None
        if release and session is not None:
            try:
                self._call("release_session", {"id": session}, timeout=30)
            except Exception:
                pass  # a session the server already ended, or a server gone: nothing left

    def close(self) -> None:
        """Release the session, if any; never raises (it runs after any failure)."""
        self._end_session(release=True)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
