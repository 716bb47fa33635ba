"""A small client of Myria's REST server (the master, http://host:8753), stdlib only.

The protocol as uwescience/myria master (2017-09) serves it (api/*Resource.java):
- bodies are JSON; errors are text/plain: a short message (400, 404, 409, 503) or, for
  anything unexpected (500), the whole Java stack trace;
- `POST /dataset` (JSON, blocks until ingested) -> 201 + DatasetStatus;
- `POST /function` -> 200 + a bare number (blocks until every worker has stored it);
- `POST /query` (a JSON plan) -> 202 + `Location: .../query/query-N`; `GET` that location
  answers 202 while the query is ACCEPTED, RUNNING or KILLING and 200 once it is SUCCESS,
  ERROR, KILLED or UNKNOWN (a 200 is not a success: `status` says); on ERROR `message`
  holds the cause, a Python traceback when a UDF raised; `DELETE` it kills the query;
- `GET /dataset/user-U/program-P/relation-R/data?format=json` -> the tuples as a JSON
  array of objects (a BLOB as standard base64); `DELETE /dataset/...` -> 204.
Every reply becomes a value or one line: `MyriaError` (the server answered) or
EngineUnavailable (it could not be reached, or the connection dropped).
"""
from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from pipelines.errors import EngineUnavailable

JSON = "application/json"
FINISHED = ("SUCCESS", "ERROR", "KILLED", "UNKNOWN")


class MyriaError(RuntimeError):
    """The server answered with an error: `status` (HTTP) and its text."""

    def __init__(self, url: str, what: str, status: int | None, text: str):
        line = first_useful_line(text)
        code = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"Myria at {url}: {what}{code}" + (f": {line}" if line else ""))
        self.status, self.text = status, text


def first_useful_line(text: str) -> str:
    """One line of an error text: a Python traceback's last line (the exception), else
    the first line (a Java stack trace's is the exception and its message)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1][:300]
    return lines[0][:300]


def relation_path(name: str) -> str:
    return f"/dataset/user-public/program-adhoc/relation-{urllib.parse.quote(name)}"


@dataclass
class Myria:
    """One Myria REST server. `poll` is the first wait between status requests (it grows
    to `poll_max`); a query itself has no time limit (Ctrl-C kills it on the server)."""

    url: str
    timeout: float = 60.0  # each request's; a query is waited for by polling
    poll: float = 0.1
    poll_max: float = 2.0
    # Myria 2017-09 asks for none (its admin filter guards no endpoint); a proxy in front
    # of it may want HTTP Basic: the engine passes MYRIA_USER / MYRIA_PASSWORD, if set
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log or traceback

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        self.headers = {"Accept": JSON, "Content-Type": JSON}
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    # -- one request --------------------------------------------------------------------
    def call(self, method: str, path: str, body=None, timeout: float | None = -1.0):
        """(status, headers, body bytes) of one request; `body` a dict (sent as JSON) or
        bytes. A status >= 400 raises MyriaError; an unreachable server or a dropped
        connection EngineUnavailable."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        url = path if path.startswith(("http://", "https://")) else self.url + path
        request = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(
                    request, timeout=self.timeout if timeout == -1.0 else timeout) as reply:
                return reply.status, reply.headers, reply.read()
        except urllib.error.HTTPError as exc:
            raise MyriaError(self.url, f"{method} {urllib.parse.urlsplit(url).path}",
                             exc.code, exc.read().decode("utf-8", "replace")) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            raise EngineUnavailable(f"Myria at {self.url}: unreachable or connection "
                                    f"lost ({reason})") from None

    def reply(self, method: str, path: str, body=None, timeout: float | None = -1.0):
        """(status, headers, the body read as JSON) of one request; a body that is not
        JSON (a proxy's HTML page, say) is a MyriaError, not a JSONDecodeError."""
        status, headers, data = self.call(method, path, body, timeout)
        try:
            return status, headers, json.loads(data) if data.strip() else None
        except ValueError:
            raise MyriaError(self.url, f"{method} {path}", status,
                             f"not JSON: {data[:200]!r}") from None

    def json(self, method: str, path: str, body=None, timeout: float | None = -1.0):
        return self.reply(method, path, body, timeout)[2]

    def _query_status(self, method: str, path: str, body=None):
        status, headers, reply = self.reply(method, path, body)
        if not isinstance(reply, dict):
            raise MyriaError(self.url, f"{method} {path}", status,
                             f"not a query status: {reply!r:.200}")
        return status, headers, reply

    # -- the protocol -------------------------------------------------------------------
    def alive_workers(self) -> list[int]:
        return self.json("GET", "/workers/alive")

    def version(self) -> str:
        found = self.json("GET", "/server") or {}
        return f"{found.get('branch', '?')}@{str(found.get('commit', '?'))[:10]}"

    def register(self, function: dict) -> None:
        """POST /function; it blocks until each worker stored it (no client timeout)."""
        self.call("POST", "/function", function, timeout=None)

    def ingest_csv(self, name: str, columns: list[tuple[str, str]], rows,
                   broadcast: bool = False) -> dict:
        """A small relation of numbers and strings (CSV through DatasetEncoding's Bytes
        source; CSV cannot carry a BLOB). `broadcast`: every worker holds all of it."""
        text = "".join(",".join(str(v) for v in row) + "\n" for row in rows)
        body = {"relationKey": relation_key(name),
                "schema": {"columnTypes": [t for _, t in columns],
                           "columnNames": [n for n, _ in columns]},
                "source": {"dataType": "Bytes",
                           "bytes": base64.b64encode(text.encode()).decode()},
                "overwrite": True}
        if broadcast:
            body["distributeFunction"] = {"type": "Broadcast"}
        return self.json("POST", "/dataset", body, timeout=None)

    def run(self, plan: dict) -> dict:
        """Submit a JSON plan and wait for it; returns the final status of a SUCCESS.
        ERROR, KILLED or UNKNOWN raise MyriaError with one line of `message`. Ctrl-C
        kills the query on the server (DELETE) before it is re-raised, once its id came
        back (a Ctrl-C during the POST itself leaves nothing to name), and so does a
        reply while waiting that is not a query status."""
        where = None
        try:
            status, headers, reply = self._query_status("POST", "/query", plan)
            query = reply.get("queryId")
            # polled on this client's base URL: the server builds Location from its own
            # view of the host, which a proxy or a tunnel may not share
            location = headers.get("Location") or f"/query/query-{query}"
            where = urllib.parse.urlsplit(location).path or f"/query/query-{query}"
            wait = self.poll
            while status == 202 and reply.get("status") not in FINISHED:
                time.sleep(wait)
                wait = min(wait * 2, self.poll_max)
                status, _, reply = self._query_status("GET", where)
        except (KeyboardInterrupt, MyriaError):
            if where is not None:
                self.kill(where)
            raise
        if reply.get("status") != "SUCCESS":
            raise MyriaError(self.url, f"query {query} ended {reply.get('status')}", None,
                             reply.get("message") or "")
        return reply

    def kill(self, where: str) -> None:
        """DELETE a query; one that already ended (400) or is unknown is left as is."""
        try:
            self.call("DELETE", where, timeout=30)
        except (MyriaError, EngineUnavailable):
            pass

    def rows(self, name: str):
        """A relation's tuples, one dict at a time, read as they stream in (a relation of
        BLOBs does not fit the client at once). Myria's JSON writer prints each tuple as
        one flat object; a BLOB is base64, so no value holds '}' (these relations have no
        STRING column), and each object ends at its first '}'."""
        url = self.url + relation_path(name) + "/data?format=json"
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                yield from _objects(reply)
        except urllib.error.HTTPError as exc:
            raise MyriaError(self.url, f"GET {relation_path(name)}/data", exc.code,
                             exc.read().decode("utf-8", "replace")) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            raise EngineUnavailable(f"Myria at {self.url}: unreachable or connection "
                                    f"lost ({reason})") from None

    def delete(self, name: str) -> None:
        self.call("DELETE", relation_path(name), timeout=30)


def relation_key(name: str) -> dict:
    """A relation in MyriaL's default namespace (`name` means public:adhoc:name)."""
    return {"userName": "public", "programName": "adhoc", "relationName": name}


def _objects(stream, chunk: int = 1 << 20):
    """The flat JSON objects of a JSON array, from a byte stream, one at a time; a stream
    that ends inside an object, or before the array's ']', was cut: IncompleteRead."""
    buffer, searched = bytearray(), 0
    while True:
        start = buffer.find(b"{")
        end = buffer.find(b"}", max(start, searched)) if start >= 0 else -1
        if end >= 0:
            yield json.loads(bytes(buffer[start:end + 1]))
            del buffer[:end + 1]
            searched = 0
            continue
        searched = len(buffer)
        more = stream.read(chunk)
        if not more:
            if start >= 0 or not bytes(buffer).strip().lstrip(b"[,").strip() == b"]":
                raise http.client.IncompleteRead(bytes(buffer[:100]))
            return
        buffer.extend(more)
