"""What `POST /function` ships for each step: a Python UDF that Myria's Python 2 workers
can load, which runs the suite's own kernels under Python 3.

Myria's worker (python/MyriaPythonWorker.py, uwescience/myria master 2017-09) runs
`python` (Python 2), reads the function as `cPickle.loads(urlsafe_b64decode(binary))` and
calls it with `tuple_list`: a list of tuples, each a list of the call's arguments (LONG
as int, DOUBLE as float, BLOB already unpickled: a `str`, or the int 0 for a null).
Python 3 cannot make a cloudpickle that Python 2 loads, so `binary` here is a small
protocol-2 pickle written opcode by opcode: it calls `__builtin__.eval` on an expression
that compiles SHIM (source text valid in Python 2 and 3) into a fresh namespace and
returns its `udf`. SHIM pipes the tuples to a child process, `engines.myria.udf_child`,
run with `--myria-python` in `--myria-suite` on the worker, the role SciDB's stream child
plays for that engine; the child stays up for the worker process's life (one per step).
"""
from __future__ import annotations

import base64
import hashlib
import struct

# Valid Python 2 and 3. Frames (all integers big-endian): request b'R' n_tuples, then per
# tuple n_values and per value b'L' int64 | b'D' double | b'B' length bytes; answer
# b'O' n then n times (length bytes; for a LONG function, 8 bytes: an int64), or b'E'
# length utf-8 text (one line: the error).
SHIM = r'''
import os
import struct
import subprocess

COMMAND = %(command)r
SUITE = %(suite)r
MULTIVALUED = %(multivalued)r
LONG = %(long)r  # a LONG function's answers are int64s, not BLOBs
_child = []


def _start():
    env = dict(os.environ)
    for name in ('PYTHONPATH', 'PYTHONHOME'):  # the worker's Python 2 settings
        env.pop(name, None)
    env['PYTHONPATH'] = SUITE
    return subprocess.Popen(COMMAND, cwd=SUITE, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def _read(stream, size):
    data = stream.read(size)
    if len(data) != size:
        raise RuntimeError('iab child %%s ended (status %%s); its error is in the Myria '
                           'worker log' %% (' '.join(COMMAND), _child[0].poll()))
    return data


def _request(tuples):
    parts = [b'R', struct.pack('>i', len(tuples))]
    for values in tuples:
        parts.append(struct.pack('>i', len(values)))
        for value in values:
            if isinstance(value, float):
                parts.append(b'D' + struct.pack('>d', value))
            elif isinstance(value, bytes):
                parts.append(b'B' + struct.pack('>I', len(value)) + value)
            else:
                parts.append(b'L' + struct.pack('>q', int(value)))
    return b''.join(parts)


def udf(tuple_list):
    if not _child or _child[0].poll() is not None:
        _child[:] = [_start()]
    child = _child[0]
    child.stdin.write(_request(tuple_list))
    child.stdin.flush()
    kind = _read(child.stdout, 1)
    count = struct.unpack('>I' if kind == b'E' else '>i', _read(child.stdout, 4))[0]
    if kind == b'E':
        raise RuntimeError(_read(child.stdout, count).decode('utf-8'))
    results = []
    for _ in range(count):
        size = struct.unpack('>I', _read(child.stdout, 4))[0]
        results.append(_read(child.stdout, size))
    if LONG:
        results = [struct.unpack('>q', r)[0] for r in results]
    if MULTIVALUED:
        return results
    if len(results) != 1:
        raise RuntimeError('iab child answered %%d values, not 1' %% len(results))
    return results[0]
'''

# Evaluated by `__builtin__.eval` when the pickle loads: runs SHIM, returns its `udf`.
LOADER = ("(lambda n: eval(compile(n['s'], '<iab-udf>', 'exec'), n) or n['udf'])"
          "({'s': %r, '__name__': 'iab_udf'})")


def source(step: str, python: str, suite: str, stage: str, multivalued: bool,
           output_type: str = "BLOB_TYPE") -> str:
    """SHIM for one step: the child's command line is fixed here (absolute paths on the
    workers); what changes per run (parameters, sigma, gradients) it reads from the
    stage folder, named by the run's key, the UDF's first argument."""
    command = [python, "-u", "-m", "engines.myria.udf_child", step, stage]
    return SHIM % {"command": command, "suite": suite, "multivalued": multivalued,
                   "long": output_type == "LONG_TYPE"}


def loader_pickle(text: str) -> bytes:
    """A protocol-2 pickle that, loaded, is `eval(LOADER % text)`: opcodes PROTO 2,
    GLOBAL '__builtin__ eval' (Python 3 maps it to builtins), BINSTRING of the expression
    (a `str` in Python 2; ASCII, so a `str` in Python 3 too), TUPLE1, REDUCE, STOP."""
    expression = (LOADER % text).encode("ascii")
    return (b"\x80\x02" + b"c__builtin__\neval\n" + b"T" + struct.pack("<I", len(expression))
            + expression + b"\x85" + b"R" + b".")


def function_name(step: str, python: str, suite: str, stage: str) -> str:
    """Myria has no way to remove a function (GET and POST /function only), and
    registering a name again replaces it on every worker (PythonFunctionRegistrar deletes
    the old row): so one name per step and child command, not one per session."""
    digest = hashlib.sha256(f"{python}\0{suite}\0{stage}".encode()).hexdigest()[:8]
    return f"iab_{step}_{digest}"


def registration(step: str, output_type: str, multivalued: bool, python: str, suite: str,
                 stage: str) -> dict:
    """The body of `POST /function` (CreateFunctionEncoding; no other keys: the server
    refuses unknown ones)."""
    text = source(step, python, suite, stage, multivalued, output_type)
    return {"name": function_name(step, python, suite, stage),
            "description": f"image-analytics-bench: {step} (engines.myria.udf_child)",
            "outputType": output_type, "isMultiValued": multivalued, "lang": "PYTHON",
            "binary": base64.urlsafe_b64encode(loader_pickle(text)).decode("ascii")}
