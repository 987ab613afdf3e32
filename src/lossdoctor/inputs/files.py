"""Files: atomic writes, reproducible torch saves, text reads with one-line errors."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from .errors import InputError


def read_text(path: str | Path, what: str) -> str:
    """The file's text; a missing or unreadable file is an :class:`InputError` naming ``what`` it is."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}; check the path") from None


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` atomically and byte-for-byte reproducibly: saved through a buffer, the archive's
    internal folder name does not depend on the (temporary) file name."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
