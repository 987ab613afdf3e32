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
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}; check the path") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} {p} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): is it the "
            "right file?"
        ) from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: equal once symlinks are resolved, or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# a folder given as an input stands for the files under it; a walk lists at most this many (a
# scan root of many runs): files beyond it are not guarded by identity, the paths given still are
MAX_LISTED_FILES = 100_000


def _file_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _under(folder: Path):
    """The regular files under ``folder`` (symlinked files too, not symlinked folders)."""
    count = 0
    for root, _, names in os.walk(folder):
        for name in names:
            count += 1
            if count > MAX_LISTED_FILES:
                return
            yield Path(root) / name


class InputFiles:
    """Every file a command reads, by role, once each path is resolved: a folder (a capture
    directory, a step folder with rank folders, a scan root) stands for every file under it.
    ``REPORT.json:PROFILE`` stands for the report; names that are no file (a built-in profile)
    are no input."""

    def __init__(self, roles: dict[str, str | Path | None]):
        self.by_id: dict[tuple[int, int], tuple[str, Path]] = {}  # what the file is, the file
        self.given: list[tuple[str, Path]] = []
        self.add(roles)

    def add(self, roles: dict[str, str | Path | None]) -> InputFiles:
        """These inputs too (a role's value may be a list of paths)."""
        for role, value in roles.items():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                self._add(role.replace("_", " "), path)
        return self

    def _add(self, role: str, value) -> None:
        if value is None:
            return
        path = str(value)
        if ".json:" in path and not os.path.exists(path):
            path = path.partition(".json:")[0] + ".json"  # REPORT.json:PROFILE
        p = Path(path)
        self.given.append((f"the {role}", p))
        folder = p.is_dir()
        for f in _under(p) if folder else [p]:
            fid = _file_id(f)
            what = f"a file of the {role} folder {p}" if folder else f"the {role}"
            if fid is not None:
                self.by_id.setdefault(fid, (what, f))

    def holding(self, path: str | Path) -> tuple[str, Path] | None:
        """(what it is, file) of the input that ``path`` names, if any (symlinks and hard links
        too)."""
        fid = _file_id(path)
        if fid is not None and fid in self.by_id:
            return self.by_id[fid]
        return next(((r, q) for r, q in self.given if same_file(path, q)), None)

    def files(self) -> list[tuple[str, Path]]:
        return list(self.by_id.values())


def check_output(option: str, path: str | Path, inputs: InputFiles) -> None:
    """Refuse an output ``path`` that is a directory or names a file of ``inputs``."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {p} is a directory; give a file name")
    hit = inputs.holding(p)
    if hit is not None:
        what, q = hit
        raise InputError(
            f"{option} {p} is {what} ({q}); lossdoctor never writes over an input: "
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
