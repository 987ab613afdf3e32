"""Files: atomic writes, reproducible torch saves, text reads with one-line errors."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from .errors import InputError


def read_text(path: str | Path, what: str) -> str:
    """The file's text; a missing or unreadable file is an :class:`InputError` naming ``what``
    it is."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}; check the path") from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: equal once symlinks are resolved, or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(option: str, path: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output ``path`` that is a directory or is one of ``inputs`` (role -> path)."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {p} is a directory; give a file name")
    for role, q in inputs.items():
        if q is not None and same_file(p, q):
            raise InputError(
                f"{option} {p} is the {role} ({q}); lossdoctor never writes over an input: "
                "choose another path"
            )


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a reader never sees half a file.

    Missing parent folders are created. A path that cannot be written is an :class:`InputError`.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise InputError(f"cannot write {p}: {e.strerror or e}; check the path") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(
            tmp, 0o666 & ~umask
        )  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` atomically and byte-for-byte reproducibly: saved through a buffer, the
    archive's internal folder name does not depend on the (temporary) file name."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
