"""Property: whatever pickle opcode stream a file holds, reading it runs no code and raises nothing
but InputError.

Streams are built opcode by opcode from a small grammar (GLOBAL, STACK_GLOBAL, INST, OBJ, REDUCE,
NEWOBJ, NEWOBJ_EX, BUILD, persistent ids, memo) over a pool of safe globals (tensor rebuilds,
containers, storage types) and hostile ones whose arguments would create a marker file; then some
are cut or corrupted. Each stream is read as a plain pickle, as the data.pkl of a zip archive, as
the main pickle of the legacy format, and through the checkpoint and batch loaders.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lossdoctor.inputs.batch import load_batch  # noqa: E402
from lossdoctor.inputs.checkpoint import load_checkpoint  # noqa: E402
from lossdoctor.inputs.errors import InputError  # noqa: E402
from lossdoctor.inputs.torchfile import MAGIC_NUMBER, PROTOCOL_VERSION, read_bytes  # noqa: E402

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"lossdoctor-fuzz-marker-{os.getpid()}"
HOSTILE_FILE = MARKER.with_suffix(".evil")
CMD = f"touch {MARKER}"

SAFE = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "Size"),
    ("torch", "FloatStorage"),
    ("torch", "float32"),
    ("builtins", "set"),
    ("_codecs", "encode"),
    ("torch.storage", "_load_from_bytes"),
    ("torch._utils", "_rebuild_parameter"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("mmengine.config.config", "ConfigDict"),
]
HOSTILE = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "exec"),
    ("builtins", "eval"),
    ("builtins", "open"),
    ("subprocess", "check_call"),
    ("subprocess", "Popen"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("torch", "load"),
    ("pickle", "loads"),
    ("__builtin__", "exec"),
    ("nt", "system"),
    ("runpy", "run_path"),
]


def _hostile_pickle() -> bytes:
    class P:
        def __reduce__(self):
            return (os.system, (CMD,))

    return pickle.dumps(P(), protocol=2)


ARGS = [
    CMD,
    f"open({str(MARKER)!r}, 'w').close()",
    str(MARKER),
    "w",
    ["touch", str(MARKER)],
    str(HOSTILE_FILE),
    _hostile_pickle(),
    "os",
    "system",
    0,
    7,
    -1,
    10**12,
]


def text(s: str) -> bytes:
    b = s.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


def emit(node) -> bytes:
    """Opcodes that push ``node`` on the unpickler's stack."""
    kind = node[0]
    if kind == "value":
        return _plain(node[1])
    if kind in ("tuple", "list"):
        body = b"".join(emit(n) for n in node[1])
        return b"(" + body + (b"t" if kind == "tuple" else b"l")
    if kind == "dict":
        return b"(" + b"".join(emit(k) + emit(v) for k, v in node[1]) + b"d"
    if kind == "global":
        (mod, name), style = node[1], node[2]
        if style == "stack":
            return text(mod) + text(name) + b"\x93"
        return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"
    return _call(node)


def _call(node) -> bytes:
    kind, callee, args = node[0], node[1], node[2]
    body = b"".join(emit(a) for a in args)
    if kind == "reduce":
        return emit(callee) + b"(" + body + b"tR"
    if kind == "inst":
        mod, name = callee[1]
        return b"(" + body + b"i" + mod.encode() + b"\n" + name.encode() + b"\n"
    if kind == "obj":
        return b"(" + emit(callee) + body + b"o"
    if kind == "newobj":
        return emit(callee) + b"(" + body + b"t\x81"
    if kind == "newobj_ex":
        return emit(callee) + b"(" + body + b"t}\x92"
    if kind == "build":
        return emit(callee) + emit(args[0] if args else ("value", {})) + b"b"
    if kind == "persid":
        return b"(" + body + b"tQ"
    if kind == "memo":
        return emit(callee) + b"\x94h\x00"  # MEMOIZE, then BINGET 0 (may name another object)
    raise AssertionError(kind)


def _plain(v) -> bytes:
    """A value's opcodes without the PROTO/FRAME header and STOP."""
    data = pickle.dumps(v, protocol=2)
    return data[2:-1]


GLOBALS = st.builds(
    lambda g, s: ("global", g, s),
    st.sampled_from(SAFE + HOSTILE),
    st.sampled_from(["plain", "stack"]),
)
LEAVES = st.one_of(st.builds(lambda v: ("value", v), st.sampled_from(ARGS)), GLOBALS)
CALL_KINDS = ["reduce", "inst", "obj", "newobj", "newobj_ex", "build", "persid", "memo"]


def _extend(children):
    calls = st.builds(
        lambda k, c, a: (k, c, a),
        st.sampled_from(CALL_KINDS),
        GLOBALS,
        st.lists(children, max_size=4),
    )
    containers = st.one_of(
        st.builds(lambda xs: ("tuple", xs), st.lists(children, max_size=4)),
        st.builds(lambda xs: ("list", xs), st.lists(children, max_size=4)),
        st.builds(lambda kv: ("dict", kv), st.lists(st.tuples(LEAVES, children), max_size=3)),
    )
    return st.one_of(calls, containers)


TREES = st.recursive(LEAVES, _extend, max_leaves=12)


@st.composite
def streams(draw) -> bytes:
    proto = draw(st.sampled_from([b"", b"\x80\x02", b"\x80\x04"]))
    data = proto + emit(draw(TREES)) + b"."
    mutation = draw(st.sampled_from(["none", "none", "cut", "flip", "insert"]))
    if mutation == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif mutation == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    elif mutation == "insert":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(min_size=1, max_size=8)) + data[i:]
    return data


def as_zip(stream: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", stream)
        z.writestr("archive/data/0", bytes(64))
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def as_legacy(stream: bytes) -> bytes:
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True})
    )
    return head + stream + pickle.dumps(["0"], protocol=2) + (16).to_bytes(8, "little") + bytes(64)


def read_safely(data: bytes, path: Path) -> None:
    try:
        read_bytes(data)
    except InputError:
        pass
    path.write_bytes(data)
    for loader in (load_checkpoint, load_batch):
        try:
            loader(path)
        except InputError:
            pass
    assert not MARKER.exists(), "a payload ran"


@pytest.fixture(scope="module", autouse=True)
def hostile_file():
    HOSTILE_FILE.write_bytes(_hostile_pickle())
    MARKER.unlink(missing_ok=True)
    yield
    HOSTILE_FILE.unlink(missing_ok=True)
    assert not MARKER.exists()


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(tmp_path_factory, stream: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.pt"
    for data in (stream, as_zip(stream), as_legacy(stream)):
        read_safely(data, path)


@FAST
@given(stream=streams())
def test_random_pickle_streams_run_no_code(tmp_path_factory, stream):
    _check(tmp_path_factory, stream)


@pytest.mark.slow
@LONG
@given(stream=streams())
def test_random_pickle_streams_run_no_code_long(tmp_path_factory, stream):
    _check(tmp_path_factory, stream)


def test_the_grammar_reaches_hostile_calls_that_would_run():
    """The generator is not toothless: one of its streams, read by the real pickle, runs code."""
    stream = (
        b"\x80\x02"
        + emit(
            (
                "reduce",
                ("global", ("builtins", "open"), "stack"),
                [("value", str(MARKER)), ("value", "w")],
            )
        )
        + b"."
    )
    MARKER.unlink(missing_ok=True)
    try:
        pickle.loads(stream).close()
        assert MARKER.exists()
    finally:
        MARKER.unlink(missing_ok=True)
    read_safely(stream, MARKER.with_suffix(".pt"))
    MARKER.with_suffix(".pt").unlink(missing_ok=True)


def test_a_real_checkpoint_survives_the_zip_path():
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    assert torch.equal(read_bytes(buf.getvalue()).obj["w"], torch.arange(4.0))
