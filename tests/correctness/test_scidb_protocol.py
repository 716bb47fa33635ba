"""The SciDB engine's two protocol pieces, on what the documentation and shim's own tests
pin down (no SciDB server runs here, and nothing else is claimed): the binary cell format
of SciDB's `input()` / `save()`, byte for byte, and the shim client's handling of each
reply shim 19.11 gives (its status codes and bodies, as shim's tests/status_code.sh
expects them), served by a local HTTP server that plays them back; and the engine's own
handling of them (start-up, a server lost mid-step, its cleanup)."""
import http.server
import signal
import struct
import threading
import time
import urllib.parse

import numpy as np
import pytest

from engines.scidb import binary
from engines.scidb.engine import SciDBEngine
from engines.scidb.shim import Shim, ShimError
from pipelines import neuro
from pipelines.errors import EngineLost, EngineUnavailable
from pipelines.steps import RunContext
from tests.processes import serving

pytestmark = pytest.mark.correctness


# -- the binary format --------------------------------------------------------------------

def test_binary_cells_are_the_documented_bytes():
    """SciDB's "Binary Files" page: little-endian, no separators; a nullable value is
    preceded by 0xFF, a null by its missing reason (0..127) and zero-filled bytes."""
    fmt = binary.Format.parse("(double null, int64)", ["v", "k"])
    assert fmt.string == "(double null, int64)" and fmt.dtype.itemsize == 17
    encoded = binary.encode({"v": np.array([1.5]), "k": np.array([7])}, fmt)
    assert encoded == b"\xff" + struct.pack("<d", 1.5) + struct.pack("<q", 7)
    null_cell = b"\x00" + bytes(8) + struct.pack("<q", 8)  # missing reason 0
    got = binary.decode(encoded + null_cell, fmt)
    assert got["k"].tolist() == [7, 8]
    assert got["v"][0] == 1.5 and np.isnan(got["v"][1])


def test_binary_round_trips_an_image_with_its_coordinates():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(4, 5, 6)).astype(np.float32)
    x, y, z = (c.ravel() for c in np.indices(image.shape))
    fmt = binary.Format.parse("(int64, int64, int64, float)", ["x", "y", "z", "v"])
    cells = binary.decode(binary.encode({"x": x, "y": y, "z": z, "v": image.ravel()}, fmt),
                          fmt)
    back = np.zeros_like(image)
    back[cells["x"], cells["y"], cells["z"]] = cells["v"]
    assert np.array_equal(back, image) and cells["v"].dtype == np.float32


def test_binary_reads_string_and_binary_cells_as_documented():
    """A stream's answer saved as binary: a variable-size value is its uint32 byte count
    and the bytes, a string's counting its NUL; a null is its missing reason and a count
    of 0 (the docs' worked example, then a row of nulls)."""
    fmt = binary.Format.parse("(double null, int64, string, binary null)", "vksb")
    example = b"\xff" + struct.pack("<d", 1.5) + struct.pack("<q", 7) \
        + struct.pack("<I", 3) + b"ab\x00" + b"\xff" + struct.pack("<I", 2) + b"\x00z"
    nulls = b"\x00" + bytes(8) + struct.pack("<q", 8) + struct.pack("<I", 1) + b"\x00" \
        + b"\x05" + bytes(4)
    got = binary.decode(example + nulls, fmt)
    assert got["v"][0] == 1.5 and np.isnan(got["v"][1]) and got["k"].tolist() == [7, 8]
    assert got["s"].tolist() == ["ab", ""] and got["b"].tolist() == [b"\x00z", None]
    with pytest.raises(binary.FormatError, match="cut short at byte 17 of 20"):
        binary.decode(example[:20], fmt)


@pytest.mark.parametrize("text,says", [
    ("double", "a binary format is '(type[ null], ...)'"),
    ("(double, datetime)", "'datetime' is not a SciDB type read here"),
    ("(double nul)", "'double nul' is not a SciDB type read here"),
])
def test_binary_format_errors_are_one_line(text, says):
    with pytest.raises(binary.FormatError, match=r".*") as err:
        binary.Format.parse(text)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_binary_refuses_partial_cells_and_null_integers():
    fmt = binary.Format.parse("(int64 null)")
    with pytest.raises(binary.FormatError, match="not whole cells"):
        binary.decode(bytes(10), fmt)
    with pytest.raises(binary.FormatError, match="1 null int64 cells"):
        binary.decode(b"\x00" + bytes(8), fmt)


# -- the shim client against shim's replies ------------------------------------------------

class Replay(http.server.BaseHTTPRequestHandler):
    """Plays shim: `script` maps an endpoint to a list of (status, body) replies, used in
    turn (a callable gives its reply when the request comes; ("drop", bytes) sends those
    raw bytes and closes the connection); every request is logged as (method, endpoint,
    params, body)."""

    script: dict = {}
    log: list = []

    def _reply(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        endpoint = url.path.strip("/")
        self.log.append((self.command, endpoint, params, body))
        reply = self.script[endpoint].pop(0)
        status, text = reply() if callable(reply) else reply
        if status == "drop":
            self.wfile.write(text)
            self.close_connection = True
            return
        data = text.encode() if isinstance(text, str) else text
        try:
            self.send_response(status, "OK" if status == 200 else "ERROR")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "text/plain" if status == 200 else "text/html")
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client left (a Ctrl-C): no one to answer
            pass

    do_GET = do_POST = _reply

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def shim_server():
    Replay.script, Replay.log = {}, []
    with serving(Replay) as url:
        yield url, Replay


SESSION = "0a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p"  # 32 of shim's [0-9a-z]


def test_a_session_runs_uploads_and_reads(shim_server):
    url, replay = shim_server
    cells = binary.encode({"a0": np.arange(3.0)}, binary.Format.parse("(double)"))
    replay.script = {"new_session": [(200, SESSION)],
                     "upload": [(200, "/tmp/shim_input_buf_AbC123")],
                     "execute_query": [(200, "1234"), (200, "1235")],
                     "read_bytes": [(200, cells)], "release_session": [(200, "")]}
    with Shim(url, user="iab", password="secret") as shim:
        path = shim.upload(b"\x01\x02")
        assert path == "/tmp/shim_input_buf_AbC123"
        assert shim.execute(f"store(input(<v:double not null>[i], '{path}', -2, "
                            f"'(double)'), a)") == "1234"
        assert shim.execute("scan(a)", save="(double)") == "1235"
        got = binary.decode(shim.read_bytes(), binary.Format.parse("(double)"))
        assert got["a0"].tolist() == [0.0, 1.0, 2.0]
    log = replay.log
    assert [entry[1] for entry in log] == ["new_session", "upload", "execute_query",
                                           "execute_query", "read_bytes", "release_session"]
    assert log[0][2] == {"user": "iab", "password": "secret"}
    assert log[1][0] == "POST" and log[1][3] == b"\x01\x02" and log[1][2] == {"id": SESSION}
    assert log[3][2] == {"id": SESSION, "query": "scan(a)", "save": "(double)"}
    assert log[4][2] == {"id": SESSION, "n": "0"}


def test_a_plus_in_a_query_reaches_shim_as_a_plus(shim_server):
    """shim decodes '+' in a query string as a space: it must travel as %2B."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)], "execute_query": [(200, "1")]}
    shim = Shim(url).open()
    shim.execute("apply(a, b, v + 1)")
    assert replay.log[1][2]["query"] == "apply(a, b, v + 1)"


def test_a_failed_query_is_one_line_and_the_session_lives(shim_server):
    url, replay = shim_server
    error = ("UserQueryException in file: src/query/ops/scan/LogicalScan.cpp "
             "function: inferSchema line: 78\nError id: scidb::SCIDB_SE_QPROC::"
             "SCIDB_LE_ARRAY_DOESNT_EXIST\nError description: Query processor error. "
             "Array 'public.nope' does not exist.")
    replay.script = {"new_session": [(200, SESSION)], "execute_query": [(406, error)]}
    shim = Shim(url).open()
    with pytest.raises(ShimError) as err:
        shim.execute("scan(nope)")
    assert str(err.value) == (f"SciDB at {url}: execute_query: query failed (HTTP 406): "
                              f"Error description: Query processor error. Array "
                              f"'public.nope' does not exist.")
    assert err.value.text == error and shim.session == SESSION  # a 4xx keeps the session


@pytest.mark.parametrize("text,line", [
    ("UserQueryException in file: x.cpp line: 1\nError id: scidb::SCIDB_SE_X::Y\n",
     "Error id: scidb::SCIDB_SE_X::Y"),
    ("Session not found", "Session not found"), ("", "")])
def test_an_error_without_a_description_says_its_id_or_first_line(text, line):
    assert ShimError("u", "e", 406, text).headline == line


def test_a_lost_session_is_reopened_once(shim_server):
    """404 "Session not found": shim reaped the idle session (its pool was full) before
    the query reached SciDB; a new session runs it."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION), (200, "x" * 32)],
                     "execute_query": [(404, "Session not found"), (200, "77")]}
    shim = Shim(url).open()
    assert shim.execute("list('arrays')") == "77" and shim.session == "x" * 32
    assert replay.log[-1][2]["id"] == "x" * 32


def test_a_lost_scidb_connection_is_a_server_gone(shim_server):
    """502: shim ended the session itself; SciDB cannot go on (EngineUnavailable, which
    a step turns into EngineLost)."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)],
                     "execute_query": [(502, "SciDB connection failed")]}
    shim = Shim(url).open()
    with pytest.raises(EngineUnavailable, match=rf"^SciDB at {url}: execute_query: SciDB "
                                                r"connection lost \(session ended\) \(HTTP "
                                                r"502\): SciDB connection failed$"):
        shim.execute("list()")
    assert shim.session is None
    shim.close()  # nothing to release: no request
    assert [entry[1] for entry in replay.log] == ["new_session", "execute_query"]


def test_after_a_shim_failure_the_next_query_runs_in_a_new_session(shim_server):
    """500: shim leaves the session to the client, which releases it; the next call opens
    a new one."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION), (200, "x" * 32)],
                     "execute_query": [(500, "Out of memory"), (200, "8")],
                     "release_session": [(200, ""), (200, "")]}
    shim = Shim(url).open()
    with pytest.raises(ShimError, match=r"shim failed \(session ended\) \(HTTP 500\): "
                                        r"Out of memory$"):
        shim.execute("list()")
    assert shim.execute("list()") == "8"
    shim.close()
    assert [(e[1], e[2].get("id")) for e in replay.log] == [
        ("new_session", None), ("execute_query", SESSION), ("release_session", SESSION),
        ("new_session", None), ("execute_query", "x" * 32), ("release_session", "x" * 32)]


def test_a_step_whose_server_is_lost_is_engine_lost(shim_server, tmp_path):
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)],
                     "execute_query": [(502, "SciDB connection failed")]}
    engine = SciDBEngine(url=url)
    engine.shim = Shim(url).open()
    with pytest.raises(EngineLost, match=r"SciDB connection failed \(during brain_mask\)$"):
        engine.run_step(neuro.BRAIN_MASK, {"mean_b0": np.ones((2, 2, 2), np.float32)},
                        RunContext(tmp_path, neuro.NeuroParams(), neuro.NeuroPartitioning()))


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12",  # a body cut short
    b"SciDB went aw\r\n\r\n",  # a garbled status line
], ids=["truncated-body", "garbled-status"])
def test_a_dropped_connection_is_one_line_naming_the_server(shim_server, raw):
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)], "execute_query": [("drop", raw)]}
    shim = Shim(url).open()
    with pytest.raises(EngineUnavailable, match=rf"^SciDB at {url}: connection lost during "
                                                r"execute_query \((IncompleteRead|"
                                                r"BadStatusLine)\(") as err:
        shim.execute("list()")
    assert "\n" not in str(err.value)


def test_ctrl_c_while_a_query_runs_cancels_it_on_the_server(shim_server):
    """SIGINT reaches the client blocked on execute_query: it asks shim to cancel the
    query (which then ends), then the KeyboardInterrupt goes on."""
    url, replay = shim_server
    cancelled = threading.Event()

    def running():  # the query blocks until it is cancelled
        threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident,
                                                   signal.SIGINT)).start()
        assert cancelled.wait(30)
        return 406, "Error description: Query was cancelled."

    def cancel():
        cancelled.set()
        return 200, ""

    replay.script = {"new_session": [(200, SESSION)], "execute_query": [running],
                     "cancel": [cancel]}
    shim = Shim(url).open()
    assert threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            shim.execute("build(<v:double>[i=0:9], i)")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [(e[1], e[2]["id"]) for e in replay.log[1:]] == [("execute_query", SESSION),
                                                            ("cancel", SESSION)]


def test_credentials_stay_out_of_its_repr():
    shim = Shim("http://h:8080", user="iab", password="s3cret", http_user="web",
                http_password="t0ken")
    assert "s3cret" not in repr(shim) and "t0ken" not in repr(shim) and "iab" in repr(shim)


@pytest.mark.parametrize("status,body,says", [
    (401, "SciDB authentication failed", "authentication refused (HTTP 401)"),
    (503, "Out of resources", "no free shim session (HTTP 503): Out of resources"),
])
def test_a_session_refused_is_one_line(shim_server, status, body, says):
    url, replay = shim_server
    replay.script = {"new_session": [(status, body)]}
    with pytest.raises(ShimError, match=r".*") as err:
        Shim(url, user="iab", password="wrong").open()
    assert says in str(err.value) and "\n" not in str(err.value)


def test_cancel_with_nothing_running_is_quiet(shim_server):
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)],
                     "cancel": [(409, "Session has no query")]}
    Shim(url).open().cancel()


def test_an_unreachable_server_is_one_line():
    with pytest.raises(EngineUnavailable, match=r"SciDB at http://127.0.0.1:9: unreachable"):
        Shim("http://127.0.0.1:9", timeout=5).open()


# -- the engine's start and cleanup against shim's replies ---------------------------------

@pytest.mark.parametrize("script,says", [
    ({"new_session": [(401, "SciDB authentication failed")]},
     "new_session: authentication refused (HTTP 401): SciDB authentication failed"),
    ({"new_session": [(503, "Out of resources")]},
     "new_session: no free shim session (HTTP 503): Out of resources"),
    ({"new_session": [(200, SESSION)], "release_session": [(200, "")],
      "execute_query": [(406, "Error description: Access denied.")]},
     "execute_query: query failed (HTTP 406): Error description: Access denied."),
], ids=["refused", "full", "probe-refused"])
def test_a_server_that_refuses_at_start_is_unavailable_once(shim_server, script, says):
    """Refused credentials, no free session, a refused probe: EngineUnavailable in one
    line, so pytest skips the engine's tests with it, asking the server once."""
    from conftest import LiveEngine

    url, replay = shim_server
    replay.script = script

    class Config:
        def getoption(self, dest):
            return url if dest == "scidb_url" else None

    live = LiveEngine(Config())
    for _ in range(2):
        with pytest.raises(pytest.skip.Exception, match=r".*") as err:
            live.get("scidb")
        assert str(err.value) == f"engine scidb unavailable: SciDB at {url}: {says}"
    assert not any(replay.script.values())  # each reply used once: the release too
    assert sum(e[1] == "new_session" for e in replay.log) == 1


def test_close_stops_at_a_lost_server_and_never_raises(shim_server):
    """The first remove finds the connection dropped: no other remove is tried (each would
    wait for the server), the release is tried and its failure kept quiet."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)],
                     "execute_query": [("drop", b"garbled\r\n\r\n")],
                     "release_session": [("drop", b"")]}
    engine = SciDBEngine(url=url)
    engine.shim, engine.arrays = Shim(url).open(), ["a", "b", "c"]
    engine.close()
    assert [(e[1], e[2].get("query")) for e in replay.log] == [
        ("new_session", None), ("execute_query", "remove(c)"), ("release_session", None)]
    assert engine.shim is None and engine.arrays == []


def test_close_after_the_server_went_away_does_not_raise_or_wait():
    engine = SciDBEngine(url="http://127.0.0.1:9")
    engine.shim = Shim("http://127.0.0.1:9", timeout=2, session=SESSION)
    engine.arrays = ["a", "b"]
    began = time.monotonic()
    engine.close()
    assert time.monotonic() - began < 10 and engine.shim is None


def test_close_after_a_shim_failure_reopens_once_to_remove_its_arrays(shim_server):
    url, replay = shim_server
    replay.script = {"new_session": [(200, "x" * 32)],
                     "execute_query": [(200, "1"), (200, "2")],
                     "release_session": [(200, "")]}
    engine = SciDBEngine(url=url)
    engine.shim, engine.arrays = Shim(url), ["a", "b"]  # its session ended by a 500
    engine.close()
    assert [(e[1], e[2].get("query")) for e in replay.log] == [
        ("new_session", None), ("execute_query", "remove(b)"), ("execute_query", "remove(a)"),
        ("release_session", None)]
