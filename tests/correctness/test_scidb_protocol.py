"""The SciDB engine's two protocol pieces, on what the documentation and shim's own tests
pin down (no SciDB server runs here, and nothing else is claimed): the binary cell format
of SciDB's `input()` / `save()`, byte for byte, and the shim client's handling of each
reply shim 19.11 gives (its status codes and bodies, as shim's tests/status_code.sh
expects them), served by a local HTTP server that plays them back."""
import http.server
import struct
import threading
import urllib.parse

import numpy as np
import pytest

from engines.scidb import binary
from engines.scidb.shim import Shim, ShimError
from pipelines.errors import EngineUnavailable

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
    turn; every request is logged as (method, endpoint, params, body)."""

    script: dict = {}
    log: list = []

    def _reply(self):
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        endpoint = url.path.strip("/")
        self.log.append((self.command, endpoint, params, body))
        status, text = self.script[endpoint].pop(0)
        data = text.encode() if isinstance(text, str) else text
        self.send_response(status, "OK" if status == 200 else "ERROR")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "text/plain" if status == 200 else "text/html")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _reply

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def shim_server():
    Replay.script, Replay.log = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Replay
    server.shutdown()
    server.server_close()


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
                              f"UserQueryException in file: src/query/ops/scan/"
                              f"LogicalScan.cpp function: inferSchema line: 78")
    assert err.value.text == error and shim.session == SESSION  # a 4xx keeps the session


def test_a_lost_session_is_reopened_once(shim_server):
    """404 "Session not found": shim reaped the idle session (its pool was full) before
    the query reached SciDB; a new session runs it."""
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION), (200, "x" * 32)],
                     "execute_query": [(404, "Session not found"), (200, "77")]}
    shim = Shim(url).open()
    assert shim.execute("list('arrays')") == "77" and shim.session == "x" * 32
    assert replay.log[-1][2]["id"] == "x" * 32


def test_a_lost_scidb_connection_ends_the_session(shim_server):
    url, replay = shim_server
    replay.script = {"new_session": [(200, SESSION)],
                     "execute_query": [(502, "SciDB connection failed")]}
    shim = Shim(url).open()
    with pytest.raises(ShimError, match=r"SciDB connection lost \(session ended\) \(HTTP "
                                        r"502\): SciDB connection failed"):
        shim.execute("list()")
    assert shim.session is None
    shim.close()  # nothing to release: no request
    assert [entry[1] for entry in replay.log] == ["new_session", "execute_query"]


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
