"""The Myria engine's protocol pieces, on what Myria's sources and documentation pin
down (no Myria server runs here, and nothing else is claimed): a BLOB's bytes against the
arrays they hold; the UDF that `POST /function` ships, loaded by Python 2's cPickle where
a Python 2 is installed (as Myria's worker loads it) and by Python 3 everywhere; and the
REST client's handling of each reply the server gives (uwescience/myria master 2017-09:
QueryResource, DatasetResource, MyriaExceptionMapper), played back by a local server."""
import base64
import http.server
import json
import pickle
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from engines.myria import blob, udf
from engines.myria.rest import Myria, MyriaError, first_useful_line
from pipelines.errors import EngineUnavailable
from tests.processes import serving

pytestmark = pytest.mark.correctness
ROOT = Path(__file__).resolve().parents[2]


def python2() -> str | None:
    """A Python 2.7 that runs (pyenv's shim is on PATH even where it does not)."""
    for candidate in [*map(str, Path.home().glob(".pyenv/versions/2.7*/bin/python2.7")),
                      shutil.which("python2.7"), shutil.which("python2")]:
        if candidate and subprocess.run([candidate, "-c", "import cPickle"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


PYTHON2 = python2()


# -- BLOBs -------------------------------------------------------------------------------

@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 7.5,
    np.array([[True, False], [False, True]]),
    np.array([1e-300, -0.0, np.pi]),  # float64, exact
    np.arange(6, dtype=">i4").reshape(3, 2),  # big-endian in, little-endian stored
])
def test_a_blob_round_trips_its_array(array):
    (back,) = blob.decode(blob.encode(array))
    assert back.shape == array.shape and np.array_equal(back, array)
    assert back.dtype == array.dtype.newbyteorder("<") and back.dtype.byteorder in "<|="


def test_a_blob_is_a_pickled_byte_string_of_npy_records():
    a, b = np.ones((2, 2), np.float32), np.zeros(3, bool)
    data = blob.encode(a, b)
    assert data[:3] == b"\x80\x02T" and data.endswith(b".")
    inner = pickle.loads(data, encoding="bytes")
    assert isinstance(inner, bytes) and inner[:6] == b"\x93NUMPY" and inner[6:8] == b"\x01\x00"
    got = blob.unpack(inner)
    assert [x.dtype for x in got] == [np.float32, np.bool_] and np.array_equal(got[1], b)


def test_a_blob_as_python2_pickles_it_is_read():
    """cPickle.dumps(str, 2): SHORT_BINSTRING or BINSTRING, then BINPUT 1 (as the worker
    pickles a UDF's BLOB result)."""
    inner = blob.pack([np.arange(3.0)])
    for data in (b"\x80\x02U" + bytes([len(b"ab")]) + b"abq\x01.",
                 b"\x80\x02T" + len(inner).to_bytes(4, "little") + inner + b"q\x01."):
        assert blob.unpickled(data) in (b"ab", inner)


@pytest.mark.parametrize("data", [
    pickle.dumps([1, 2], protocol=2),  # not a byte string
    b"\x80\x02cos\nsystem\n" + b"U\x04true\x85R.",  # an object, never loaded
    b"\x80\x02U\x05ab",  # cut
])
def test_a_blob_that_is_not_a_byte_string_is_refused(data):
    with pytest.raises(ValueError, match="not a pickled byte string"):
        blob.unpickled(data)


# -- the UDF shipped with POST /function ---------------------------------------------------

def registration(tmp_path, step="probe", multivalued=False):
    return udf.registration(step, "BLOB_TYPE", multivalued, sys.executable, str(ROOT),
                            str(tmp_path))


def test_the_registration_has_only_the_fields_myria_knows(tmp_path):
    """CreateFunctionEncoding's fields (the server refuses unknown ones with 400)."""
    body = registration(tmp_path)
    assert set(body) == {"name", "description", "outputType", "isMultiValued", "lang",
                         "binary"}
    assert body["name"] == udf.function_name("probe", sys.executable, str(ROOT),
                                             str(tmp_path))
    assert body["name"].startswith("iab_probe_") and body["lang"] == "PYTHON"
    base64.urlsafe_b64decode(body["binary"])  # the worker's decoding


def test_the_udf_pickle_is_only_eval_of_the_shim(tmp_path):
    import pickletools

    code = base64.urlsafe_b64decode(registration(tmp_path)["binary"])
    ops = [op.name for op, _, _ in pickletools.genops(code)]
    assert ops == ["PROTO", "GLOBAL", "BINSTRING", "TUPLE1", "REDUCE", "STOP"]
    assert b"c__builtin__\neval\n" in code


def test_python3_loads_the_udf_and_it_runs_the_child(tmp_path):
    (tmp_path / "iab-7.json").write_text("{}")
    function = pickle.loads(base64.urlsafe_b64decode(registration(tmp_path)["binary"]))
    answer = function([[7]])
    assert answer.startswith(b"ok\t3.")
    assert function([[7]]) == answer  # the same child, kept for the worker's life


@pytest.mark.skipif(PYTHON2 is None, reason="no Python 2.7 on this machine")
def test_python2_cpickle_loads_the_udf_and_its_blobs_travel(tmp_path):
    """As MyriaPythonWorker.py does: cPickle.loads the function; BLOB arguments arrive
    unpickled (str), the result is pickled with protocol 2 and read back here."""
    volume = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    (tmp_path / "iab-9.json").write_text(json.dumps({"blocks": [[[0, 2], [0, 4], [1, 3]],
                                                                [[2, 3], [1, 2], [0, 5]]]}))
    mask = volume > 20
    (tmp_path / "img").write_bytes(blob.encode(volume))
    (tmp_path / "mask").write_bytes(blob.encode(mask))
    (tmp_path / "reg.json").write_text(json.dumps(registration(tmp_path, "split_blocks",
                                                               multivalued=True)))
    script = """
import base64, cPickle, json, sys
d = sys.argv[1]
reg = json.load(open(d + '/reg.json'))
f = cPickle.loads(base64.urlsafe_b64decode(reg['binary'].encode('ascii')))
img = cPickle.loads(open(d + '/img', 'rb').read())
mask = cPickle.loads(open(d + '/mask', 'rb').read())
assert type(img) is str
out = f([[9, 4, img, mask]])
assert type(out) is list
open(d + '/out', 'wb').write(cPickle.dumps([cPickle.dumps(o, 2) for o in out], 2))
"""
    proc = subprocess.run([PYTHON2, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = pickle.loads((tmp_path / "out").read_bytes(), encoding="bytes")
    first, second = (blob.decode(r) for r in results)
    assert np.array_equal(first[0], volume[0:2, 0:4, 1:3])
    assert np.array_equal(first[1], mask[0:2, 0:4, 1:3])
    assert np.array_equal(second[0], volume[2:3, 1:2, 0:5])


def test_a_child_error_is_raised_as_one_line(tmp_path):
    """The shim raises the child's one line: the worker sends the traceback back, and the
    query's `message` ends with it."""
    (tmp_path / "iab-3.json").write_text(json.dumps({"params": {}}))
    function = pickle.loads(base64.urlsafe_b64decode(
        registration(tmp_path, "brain_mask")["binary"]))
    with pytest.raises(RuntimeError) as err:
        function([[3, 0]])  # a null BLOB arrives as 0
    assert str(err.value).startswith("brain_mask: Arrived: the mean b0 volume arrived as 0, "
                                     "not a BLOB: a null BLOB is what DOWNLOADBLOB stores")
    assert "\n" not in str(err.value)


# -- the REST client against the server's replies ------------------------------------------

class Replay(http.server.BaseHTTPRequestHandler):
    """Plays Myria's master: `script` maps (method, path) to a list of replies
    (status, body, headers), used in turn; a reply "drop" closes the connection with no
    answer. Every request is logged as (method, path, body)."""

    script: dict = {}
    log: list = []
    auth: list = []

    def _reply(self):
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        self.log.append((self.command, url.path, body))
        self.auth.append(self.headers.get("Authorization"))
        status, text, headers = self.script[(self.command, url.path)].pop(0)
        if status == "drop":
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        data = text.encode() if isinstance(text, str) else json.dumps(text).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "text/plain" if status >= 400 or isinstance(text, str)
                         else "application/json; charset=UTF-8")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _reply

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def myria_server():
    Replay.script, Replay.log, Replay.auth = {}, [], []
    with serving(Replay) as url:
        yield url, Replay


def status(query, state, message=None):
    """QueryStatusEncoding, as the server writes it (the fields the client reads and a
    few it ignores)."""
    return {"url": f"http://master:8753/query/query-{query}", "queryId": query,
            "rawQuery": "-- a plan", "status": state, "message": message,
            "submitTime": "2017-09-20T10:00:00.000Z", "elapsedNanos": 1000,
            "language": "MyriaL", "profilingMode": [], "ftMode": "NONE"}


PLAN = {"rawQuery": "-- a plan", "logicalRa": "", "fragments": []}


def fast(url):
    return Myria(url, poll=0.001, poll_max=0.001)


def test_a_query_is_polled_through_location_until_it_succeeds(myria_server):
    url, replay = myria_server
    where = "/query/query-12"
    replay.script = {
        ("POST", "/query"): [(202, status(12, "ACCEPTED"),
                              {"Location": f"http://master-inside:8753{where}"})],
        ("GET", where): [(202, status(12, "RUNNING"), {}), (202, status(12, "RUNNING"), {}),
                         (200, status(12, "SUCCESS"), {})]}
    assert fast(url).run(PLAN)["status"] == "SUCCESS"
    assert [(m, p) for m, p, _ in replay.log] == [("POST", "/query")] + [("GET", where)] * 3
    assert json.loads(replay.log[0][2]) == PLAN


TRACEBACK = """Traceback (most recent call last):
  File "/opt/myria/reef/global/MyriaPythonWorker.py", line 177, in main
    retval = func(tuple_list)
  File "<iab-udf>", line 52, in udf
RuntimeError: denoise: ValueError: sigma must be positive
"""


@pytest.mark.parametrize("state,message,says", [
    ("ERROR", TRACEBACK, "query 5 ended ERROR: RuntimeError: denoise: ValueError: sigma "
                         "must be positive"),
    ("ERROR", "edu.washington.escience.myria.DbException: Python process exited\n\tat "
              "edu.washington.escience.myria.expression.evaluate.PythonUDFEvaluator",
     "query 5 ended ERROR: edu.washington.escience.myria.DbException: Python process "
     "exited"),
    ("KILLED", None, "query 5 ended KILLED"),
    ("UNKNOWN", None, "query 5 ended UNKNOWN"),
])
def test_a_query_that_does_not_succeed_is_one_line(myria_server, state, message, says):
    url, replay = myria_server
    replay.script = {("POST", "/query"): [(202, status(5, "ACCEPTED"),
                                           {"Location": f"{url}/query/query-5"})],
                     ("GET", "/query/query-5"): [(200, status(5, state, message), {})]}
    with pytest.raises(MyriaError) as err:
        fast(url).run(PLAN)
    assert str(err.value) == f"Myria at {url}: {says}"


def test_a_404_plain_text_reply_is_one_line(myria_server):
    url, replay = myria_server
    replay.script = {("POST", "/query"): [(202, status(8, "ACCEPTED"),
                                           {"Location": f"{url}/query/query-8"})],
                     ("GET", "/query/query-8"): [(404, "Query 8 was not found", {})]}
    replay.script[("DELETE", "/query/query-8")] = [(404, "Query 8 was not found", {})]
    with pytest.raises(MyriaError) as err:
        fast(url).run(PLAN)
    assert str(err.value) == (f"Myria at {url}: GET /query/query-8 (HTTP 404): Query 8 was "
                              f"not found")
    assert err.value.status == 404


def test_a_500_java_stack_trace_is_its_first_line(myria_server):
    url, replay = myria_server
    trace = ("edu.washington.escience.myria.DbException: java.sql.SQLException: Python "
             "functions only supported with Postgres JDBC connection\n\tat edu.washington."
             "escience.myria.functions.PythonFunctionRegistrar.<init>(PythonFunctionRegistrar"
             ".java:45)\n\tat edu.washington.escience.myria.operator.DbCreateFunction.init("
             "DbCreateFunction.java:80)\n")
    replay.script = {("POST", "/function"): [(500, trace, {})]}
    with pytest.raises(MyriaError) as err:
        fast(url).register({"name": "f"})
    assert str(err.value) == (
        f"Myria at {url}: POST /function (HTTP 500): edu.washington.escience.myria."
        f"DbException: java.sql.SQLException: Python functions only supported with "
        f"Postgres JDBC connection")


def test_a_dropped_connection_is_engine_unavailable(myria_server):
    url, replay = myria_server
    replay.script = {("GET", "/workers/alive"): [("drop", "", {})]}
    with pytest.raises(EngineUnavailable, match=rf"^Myria at {url}: unreachable or "
                                                rf"connection lost \(.+\)$"):
        fast(url).alive_workers()


def test_an_unreachable_server_is_engine_unavailable():
    with pytest.raises(EngineUnavailable, match=r"^Myria at http://127.0.0.1:9: "
                                                r"unreachable or connection lost"):
        Myria("http://127.0.0.1:9", timeout=5).alive_workers()


def test_ctrl_c_while_waiting_kills_the_query(myria_server, monkeypatch):
    url, replay = myria_server
    replay.script = {("POST", "/query"): [(202, status(3, "ACCEPTED"),
                                           {"Location": f"{url}/query/query-3"})],
                     ("DELETE", "/query/query-3"): [(200, status(3, "KILLING"), {})]}
    client = fast(url)

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr("engines.myria.rest.time.sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.run(PLAN)
    assert [(m, p) for m, p, _ in replay.log] == [("POST", "/query"),
                                                  ("DELETE", "/query/query-3")]


def test_ctrl_c_during_the_post_is_raised_with_nothing_to_kill(myria_server, monkeypatch):
    """Interrupted before a query id came back: there is no query to name."""
    url, replay = myria_server
    client = fast(url)

    def interrupted(method, path, body=None, timeout=-1.0):
        replay.log.append((method, path, body))
        raise KeyboardInterrupt

    monkeypatch.setattr(client, "call", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.run(PLAN)
    assert [(m, p) for m, p, _ in replay.log] == [("POST", "/query")]


PROXY_PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>"


def test_a_post_reply_that_is_not_json_is_one_line(myria_server):
    url, replay = myria_server
    replay.script = {("POST", "/query"): [(200, PROXY_PAGE, {})]}
    with pytest.raises(MyriaError, match=r"^Myria at .*: POST /query \(HTTP 200\): not "
                                         r"JSON: b'<html><body><h1>502"):
        fast(url).run(PLAN)
    assert [(m, p) for m, p, _ in replay.log] == [("POST", "/query")]


def test_a_poll_reply_that_is_not_a_status_is_one_line_and_kills(myria_server):
    url, replay = myria_server
    where = "/query/query-4"
    replay.script = {("POST", "/query"): [(202, status(4, "ACCEPTED"), {"Location": where})],
                     ("GET", where): [(200, PROXY_PAGE, {})],
                     ("DELETE", where): [(200, status(4, "KILLING"), {})]}
    with pytest.raises(MyriaError, match=rf"^Myria at .*: GET {where} \(HTTP 200\): not "
                                         r"JSON: b'<html>"):
        fast(url).run(PLAN)
    assert [(m, p) for m, p, _ in replay.log] == [("POST", "/query"), ("GET", where),
                                                  ("DELETE", where)]


def test_a_relation_streams_in_and_a_cut_stream_is_engine_unavailable(myria_server):
    url, replay = myria_server
    one, two = blob.encode(np.arange(3.0)), blob.encode(np.ones((2, 2), np.float32))
    rows = [{"subjId": 0, "part": 1, "value": base64.b64encode(one).decode()},
            {"subjId": 0, "part": 0, "value": base64.b64encode(two).decode()}]
    path = "/dataset/user-public/program-adhoc/relation-iab_t_r_1/data"
    replay.script = {("GET", path): [(200, json.dumps(rows), {}),
                                     (200, json.dumps(rows)[:-60], {})]}
    got = list(fast(url).rows("iab_t_r_1"))
    assert [r["part"] for r in got] == [1, 0]
    assert np.array_equal(blob.decode(base64.b64decode(got[1]["value"]))[0], np.ones((2, 2)))
    with pytest.raises(EngineUnavailable, match="connection lost"):
        list(fast(url).rows("iab_t_r_1"))


def test_ingest_sends_the_dataset_encoding(myria_server):
    url, replay = myria_server
    replay.script = {("POST", "/dataset"): [(201, {"numTuples": 2}, {})]}
    fast(url).ingest_csv("iab_t_parts_0", [("imgId", "LONG_TYPE"), ("part", "LONG_TYPE")],
                         [(0, 0), (5, 1)], broadcast=True)
    sent = json.loads(replay.log[0][2])
    assert sent == {"relationKey": {"userName": "public", "programName": "adhoc",
                                    "relationName": "iab_t_parts_0"},
                    "schema": {"columnTypes": ["LONG_TYPE", "LONG_TYPE"],
                               "columnNames": ["imgId", "part"]},
                    "source": {"dataType": "Bytes",
                               "bytes": base64.b64encode(b"0,0\n5,1\n").decode()},
                    "overwrite": True, "distributeFunction": {"type": "Broadcast"}}


def test_first_useful_line():
    assert first_useful_line("") == ""
    assert first_useful_line("\n  Query 8 was not found\n") == "Query 8 was not found"
    assert first_useful_line(TRACEBACK).startswith("RuntimeError: denoise")


def test_credentials_go_only_where_given(myria_server):
    url, replay = myria_server
    replay.script = {("GET", "/workers/alive"): [(200, [1, 2], {}), (200, [1, 2], {})]}
    assert fast(url).alive_workers() == [1, 2]
    assert Myria(url, user="iab", password="secret").alive_workers() == [1, 2]
    assert replay.auth == [None, "Basic " + base64.b64encode(b"iab:secret").decode()]
    shown = repr(Myria(url, user="iab", password="secret"))
    assert "secret" not in shown and base64.b64encode(b"iab:secret").decode() not in shown


@pytest.mark.parametrize("failing", ["/workers/alive", "/function"])
def test_a_server_that_fails_at_start_is_unavailable_in_one_line(myria_server, failing,
                                                                 tmp_path):
    """A MyriaError while starting (the workers asked for, a function registered) is
    EngineUnavailable: pytest skips the engine once, not at every test."""
    from engines.myria.engine import MyriaEngine

    url, replay = myria_server
    trace = "java.lang.NullPointerException\n\tat edu.washington.escience.myria.api\n"
    replay.script = {("GET", "/workers/alive"): [(200, [1, 2], {})],
                     ("POST", "/function"): [(500, trace, {})]}
    replay.script[("POST" if failing == "/function" else "GET", failing)] = [(500, trace, {})]
    engine = MyriaEngine(url=url, stage=str(tmp_path))
    with pytest.raises(EngineUnavailable) as err:
        engine.start()
    assert str(err.value) == (f"Myria at {url}: {'POST' if failing == '/function' else 'GET'}"
                              f" {failing} (HTTP 500): java.lang.NullPointerException")
    assert engine.rest is None and not Path(engine._files()).exists()  # closed


@pytest.mark.skipif(PYTHON2 is None, reason="no Python 2.7 on this machine")
def test_python2_gets_a_long_multivalued_udfs_ints(tmp_path):
    """warp's emit (LONG, multivalued), loaded by cPickle: a list of ints, one per patch
    the plan's emit gives the CCD (patches (0, 1) and (1, 1) of a 2 x 2 sky map)."""
    import dataclasses

    from pipelines import astro

    skymap = astro.SkyMap(154.1, -4.9, 0.333, 8, 2, 2, 2)
    (tmp_path / "iab-11.json").write_text(json.dumps({
        "params": dataclasses.asdict(astro.AstroParams()),
        "skymap": dataclasses.asdict(skymap), "emit": "pipelines.astro:_warp_emit",
        "records": [[[4, 7], [4, [[0, 1], [1, 1]], "@file"]]]}))
    (tmp_path / "reg.json").write_text(json.dumps(udf.registration(
        "warp_emit", "LONG_TYPE", True, sys.executable, str(ROOT), str(tmp_path))))
    script = """
import base64, cPickle, json, sys
d = sys.argv[1]
reg = json.load(open(d + '/reg.json'))
f = cPickle.loads(base64.urlsafe_b64decode(reg['binary'].encode('ascii')))
out = f([[11, 4, 7]])
assert type(out) is list and all(type(v) in (int, long) for v in out), out
print(json.dumps(out))
"""
    proc = subprocess.run([PYTHON2, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == [0 * 2 + 1, 1 * 2 + 1]
