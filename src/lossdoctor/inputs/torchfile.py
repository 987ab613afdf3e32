"""Read ``torch.save`` files and plain pickles without running code from them.

Every byte stream that is a pickle goes through :class:`_Unpickler`, whose ``find_class`` returns
only tensor-rebuilding functions, dtypes, storage types and plain containers; any other global a
file names becomes an inert :class:`Placeholder` that records what it stood for. No other pickle
loader is reachable: the zip format (``data.pkl`` + raw storage records), the legacy format
(magic number, protocol, sys info, main pickle, storage keys, raw storages) and a plain pickle of
any protocol are parsed here, not by ``torch.load``. TorchScript archives and legacy tar files are
refused. Storage sizes are checked against the file before anything is allocated.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import pickle
import sys
import tarfile
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError

# torch.serialization's legacy-format header
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# int64 element count that precedes each raw storage in the legacy format
LEGACY_SIZE_BYTES = 8
# size of a zip local file header before its name and extra field
ZIP_LOCAL_HEADER = 30
# storage pickled inside a pickle (torch.storage._load_from_bytes), nested at most this deep
MAX_NESTING = 2
# an expanded tensor (stride 0) may view this many times more elements than its storage holds
MAX_EXPANSION = 1 << 20
# a zip record may inflate to at most this many times its stored size, plus a little (torch.save
# stores records uncompressed; a larger ratio is a zip bomb)
MAX_INFLATION = 100
INFLATION_SLACK = 1 << 20

# Module roots whose callables reach the operating system, the interpreter, files or the network.
CODE_MODULES = frozenset(
    "os posix nt subprocess builtins __builtin__ importlib runpy pty shutil socket sys ctypes "
    "pickle _pickle cPickle marshal code codeop webbrowser multiprocessing pdb timeit commands "
    "popen2 platform signal tempfile operator functools types inspect asyncio threading _thread "
    "urllib http ftplib smtplib telnetlib io _io pathlib glob zipimport pkgutil site sysconfig "
    "distutils setuptools pip ensurepip".split()
)
# Builtins that only build plain values.
SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "bytearray": bytearray, "complex": complex}
# Functions that pickles of ordinary data name (numpy arrays, protocol-0/1 objects): replaced, but
# not a sign that a file tried to run code.
DATA_FUNCTIONS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "copy_reg._reconstructor",
    }
)


@dataclass(frozen=True)
class Replaced:
    """A global named by a file and not rebuilt. ``code``: it names a function or an entry point
    that runs code (``posix.system``, ``builtins.exec``, ...), not a data class."""

    name: str
    code: bool


@dataclass
class Loaded:
    """What a file held, with placeholders where it named other globals."""

    obj: object
    replaced: list[Replaced] = field(default_factory=list)
    kind: str = "zip"  # "zip", "legacy" or "pickle"


class Placeholder:
    """Stands in for an object of a class (or the result of a function) the reader does not
    rebuild. It keeps the arguments and state it was given, as inert data."""

    qualname = "object"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<replaced {self.qualname}>"


class _StorageType:
    """A storage class named in a pickle (``torch.FloatStorage``, ...): only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _storage_types() -> dict[str, _StorageType]:
    out = {"UntypedStorage": _StorageType(torch.uint8)}
    for dtype, name in torch.storage._dtype_to_storage_type_map().items():
        out[name] = _StorageType(dtype)
    return out


def _dtypes() -> dict[str, torch.dtype]:
    return {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, meta=None):
    """``torch._utils._rebuild_tensor_v2`` for a storage this reader made; hooks are dropped."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise InputError(f"a tensor refers to {type(storage).__name__}, not a storage")
    shape = torch.Size(size)
    elements = storage._untyped_storage.nbytes() // storage.dtype.itemsize
    if shape.numel() > MAX_EXPANSION * max(elements, 1):
        raise InputError(f"a tensor of shape {list(shape)} views a storage of {elements}")
    t = torch.empty(0, dtype=storage.dtype).set_(storage._untyped_storage, offset, shape, stride)
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() else t


def _latin1(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise InputError("a bytes record with an unexpected encoding")
    return text.encode("latin1")


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise InputError(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _latin1,
    **{("builtins", k): v for k, v in SAFE_BUILTINS.items()},
}


def _resolve_loaded(module: str, name: str):
    """The object ``module.name`` stands for, if its module is already imported (no import, no
    ``__getattr__`` runs); None otherwise."""
    obj = sys.modules.get(module)
    for part in name.split("."):
        if obj is None:
            return None
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None
    return obj


def runs_code(module: str, name: str) -> bool:
    """Whether the global ``module.name`` names something that runs code when a pickle calls it."""
    if f"{module}.{name}" in DATA_FUNCTIONS:
        return False
    if module.split(".")[0] in CODE_MODULES:
        return True
    obj = _resolve_loaded(module, name)
    return callable(obj) and not isinstance(obj, type)


class _Unpickler(pickle._Unpickler):
    """A pickle reader whose globals are restricted; ``storage(pid)`` serves persistent ids.

    The pure-Python unpickler keeps its memo in a dict, so a hostile memo index allocates nothing.
    """

    def __init__(self, file, reader: _Reader):
        super().__init__(file, encoding="utf-8")
        self.reader = reader

    def find_class(self, module, name):
        module, name = str(module), str(name)
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle itself maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return self.reader.resolve(module, name)

    def persistent_load(self, pid):
        return self.reader.storage(pid)


class _Reader:
    """Shared state of one read: allowed globals, storages by key, what was replaced."""

    def __init__(self, data_size: int, depth: int = 0):
        self.data_size = data_size
        self.allocated = 0  # storage bytes so far: together they cannot exceed the file
        self.depth = depth
        self.replaced: dict[str, Replaced] = {}
        self.storages: dict[str, torch.storage.TypedStorage] = {}
        self.fetch = None  # key, dtype, numel -> TypedStorage (set per format)
        self._types = _storage_types()
        self._dtypes = _dtypes()
        self._placeholders: dict[str, type] = {}

    def resolve(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in self._types:
            return self._types[name]
        if module == "torch" and name in self._dtypes:
            return self._dtypes[name]
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self.nested
        return self.placeholder(module, name)

    def placeholder(self, module: str, name: str) -> type:
        qualname = f"{module}.{name}"
        if qualname not in self._placeholders:
            self.replaced[qualname] = Replaced(qualname, runs_code(module, name))
            self._placeholders[qualname] = type(
                "Placeholder", (Placeholder,), {"qualname": qualname}
            )
        return self._placeholders[qualname]

    def nested(self, data):
        """A storage pickled as the bytes of a legacy torch.save (``Storage.__reduce__``)."""
        if self.depth >= MAX_NESTING or not isinstance(data, (bytes, bytearray)):
            raise InputError("a storage is nested too deeply or is not bytes")
        inner = read_stream(io.BytesIO(bytes(data)), len(data), self.depth + 1)
        self.replaced.update({r.name: r for r in inner.replaced})
        return inner.obj

    def storage(self, pid):
        if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage" or len(pid) < 5:
            if isinstance(pid, tuple) and pid and _ascii(pid[0]) == "module":
                return self.placeholder("torch.nn", "Module")
            raise InputError(f"unknown persistent id {str(pid)[:60]}")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise InputError("a storage record names no storage type or a negative size")
        if key not in self.storages:
            self.allocated += numel * stype.dtype.itemsize
            if self.allocated > self.data_size:
                raise InputError("the storages it lists are larger than the whole file")
            self.storages[key] = self.fetch(key, stype.dtype, numel)
        view = pid[5] if len(pid) > 5 else None
        return self.storages[key] if view is None else self._view(key, view)

    def _view(self, key: str, view) -> torch.storage.TypedStorage:
        view_key, offset, size = view
        root = self.storages[key]
        if str(view_key) not in self.storages:
            b = root.dtype.itemsize
            part = root._untyped_storage[offset * b : (offset + size) * b]
            self.storages[str(view_key)] = _typed(part, root.dtype)
        return self.storages[str(view_key)]

    def load(self, f):
        return _Unpickler(f, self).load()


def _ascii(v) -> str:
    return v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)


def _typed(untyped: torch.UntypedStorage, dtype: torch.dtype) -> torch.storage.TypedStorage:
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _from_bytes(data: bytes, dtype: torch.dtype, big_endian: bool) -> torch.storage.TypedStorage:
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )
    if big_endian and dtype.itemsize > 1:
        raw = raw.view(-1, dtype.itemsize).flip(1).reshape(-1)
    return _typed(raw.untyped_storage(), dtype)


def _read_zip(f, size: int) -> Loaded:
    with zipfile.ZipFile(f) as z:
        names = z.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise InputError("a TorchScript archive (torch.jit.save), not a torch.save file")
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise InputError("a zip archive without data.pkl, not a torch.save file")
        prefix = pkl[0][: -len("data.pkl")]
        big = (
            z.read(prefix + "byteorder").strip() == b"big"
            if prefix + "byteorder" in names
            else False
        )
        reader = _Reader(size)
        mapped = _mapped(f)

        def fetch(key: str, dtype: torch.dtype, numel: int):
            name, nbytes = f"{prefix}data/{key}", numel * dtype.itemsize
            view = _mapped_record(mapped, z, name, nbytes) if mapped is not None else None
            if view is not None and not (big and dtype.itemsize > 1):
                return _typed(view.untyped_storage(), dtype)
            return _from_bytes(_zip_record(z, name, nbytes), dtype, big)

        reader.fetch = fetch
        _check_inflation(z.getinfo(pkl[0]))
        with z.open(pkl[0]) as data:
            obj = reader.load(data)
    return Loaded(obj, list(reader.replaced.values()), "zip")


def _mapped(f) -> mmap.mmap | None:
    """The file mapped copy-on-write (storages then page in as they are read, and stay private
    to this process), or None where it cannot be (an in-memory or special file)."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _mapped_record(mapped: mmap.mmap, z: zipfile.ZipFile, name: str, nbytes: int):
    """A stored (uncompressed) storage record as a uint8 tensor over the mapped file, without
    reading it; None for a compressed record. A record that does not fit is refused."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise InputError(f"the archive has no storage record {name}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    header = mapped[info.header_offset : info.header_offset + ZIP_LOCAL_HEADER]
    if len(header) < ZIP_LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise InputError(f"storage record {name} has no local zip header")
    start = info.header_offset + ZIP_LOCAL_HEADER + int.from_bytes(header[26:28], "little")
    start += int.from_bytes(header[28:30], "little")
    if info.file_size < nbytes or start + nbytes > len(mapped):
        raise InputError(f"storage record {name} holds fewer bytes than it claims")
    if nbytes == 0:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=start)


def _check_inflation(info: zipfile.ZipInfo) -> None:
    if info.file_size > MAX_INFLATION * info.compress_size + INFLATION_SLACK:
        raise InputError(
            f"zip record {info.filename} inflates {info.file_size} bytes from {info.compress_size}"
        )


def _zip_record(z: zipfile.ZipFile, name: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of a storage record; a missing or short record is refused."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise InputError(f"the archive has no storage record {name}") from None
    _check_inflation(info)
    if info.file_size < nbytes:
        raise InputError(
            f"storage record {name} holds {info.file_size} bytes, fewer than it claims"
        )
    with z.open(info) as f:
        return f.read(nbytes)


def _read_legacy(f, size: int, depth: int) -> Loaded:
    reader = _Reader(size, depth)
    first = reader.load(f)
    if type(first) is not int or first != MAGIC_NUMBER:
        return Loaded(first, list(reader.replaced.values()), "pickle")  # one plain pickle
    if reader.load(f) != PROTOCOL_VERSION:
        raise InputError("an unknown legacy torch.save protocol version")
    info = reader.load(f)
    big = isinstance(info, dict) and info.get("little_endian") is False
    pending: dict[str, tuple[torch.dtype, int]] = {}

    def fetch(key: str, dtype: torch.dtype, numel: int):
        pending[key] = (dtype, numel)
        return _typed(torch.UntypedStorage(numel * dtype.itemsize), dtype)

    reader.fetch = fetch
    obj = reader.load(f)
    keys = reader.load(f)
    if not isinstance(keys, list):
        raise InputError("the legacy storage list is not a list")
    for key in keys:
        _fill_legacy(f, reader.storages, pending, str(key), big)
    return Loaded(obj, list(reader.replaced.values()), "legacy")


def _fill_legacy(f, storages: dict, pending: dict, key: str, big: bool) -> None:
    """Read one raw storage (int64 element count, then the elements) into its storage."""
    if key not in pending:
        raise InputError(f"the file lists storage {key!r} that no tensor uses")
    dtype, numel = pending[key]
    header = f.read(LEGACY_SIZE_BYTES)
    count = int.from_bytes(header, "big" if big else "little", signed=True)
    if len(header) < LEGACY_SIZE_BYTES or count != numel:
        raise InputError(f"storage {key} is truncated or its size does not match")
    data = f.read(numel * dtype.itemsize)
    if len(data) < numel * dtype.itemsize:
        raise InputError(f"storage {key} is truncated")
    storages[key]._untyped_storage.copy_(_from_bytes(data, dtype, big)._untyped_storage)


def read_stream(f, size: int, depth: int = 0) -> Loaded:
    """Read a torch.save file or a plain pickle from a seekable binary stream of ``size`` bytes.

    Raises :class:`InputError` (whose message says what is wrong with the file) on anything else.
    """
    start = f.read(4)
    f.seek(0)
    if start[:2] == b"PK":
        return _read_zip(f, size)
    if tarfile.is_tarfile(f):
        raise InputError("a legacy tar-format torch.save file; load and re-save it with torch.save")
    f.seek(0)
    return _read_legacy(f, size, depth)


def noting_payloads(error: InputError, replaced: list[Replaced]) -> InputError:
    """``error``, saying which code-running globals the file named (and that none ran)."""
    code = [r.name for r in replaced if r.code]
    if not code:
        return error
    return InputError(f"{error} (the file names {', '.join(code)}, which was not run)")


def read_file(path: str | Path) -> Loaded:
    """Read ``path`` without running code from it; see :func:`read_stream`."""
    p = Path(path)
    with _one_error():
        with open(p, "rb") as f:
            return read_stream(f, p.stat().st_size)


def read_bytes(data: bytes) -> Loaded:
    """Read a torch.save file or pickle held in memory; see :func:`read_stream`."""
    with _one_error():
        return read_stream(io.BytesIO(data), len(data))


@contextmanager
def _one_error():
    """Whatever a corrupt or hostile stream makes the parser raise becomes one InputError."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # struct, pickle, zip, torch and Python errors alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{type(e).__name__}: {first}") from None
