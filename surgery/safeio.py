"""Writing to the user's disk without ever losing what is there.

Rules (docs/safety.md): a symlink given as an output is refused, never followed; a
file or folder is written beside its target under a temporary name and renamed over
it only when complete; a folder is replaced only if it is empty or one of our
artifacts; a replace is an atomic exchange where the OS has one (Linux renameat2),
and leftovers of a run killed mid-save are restored or removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import SurgeryError

log = logging.getLogger(__name__)

PARTIAL, OLD = "partial", "old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[^/]*$")
# Set by tests to exercise the two-rename fallback that platforms without renameat2 take.
_EXCHANGE_DISABLED_ENV = "SURGERY_NO_RENAME_EXCHANGE"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and artifacts record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_symlink(path: Path, what: str) -> None:
    if path.is_symlink():
        raise SurgeryError(f"{what} {str(path)!r} is a symlink; give the real path (surgery never writes "
                           "through a link)")


def check_parent(path: Path, what: str) -> None:
    """The folder that will receive ``path`` exists and is writable: checked before any slow work."""
    parent = path.absolute().parent
    if not parent.is_dir():
        raise SurgeryError(f"cannot write {what} {str(path)!r}: folder {str(parent)!r} does not exist; "
                           f"create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SurgeryError(f"cannot write {what} {str(path)!r}: folder {str(parent)!r} is not writable; "
                           "choose another location")


def _temp_dir(target: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.absolute().parent))


def check_file_target(path: str | Path, *, force: bool, what: str = "output") -> Path:
    """Checks for a single-file output: no symlink, not a folder, parent writable, no silent overwrite."""
    path = Path(path)
    refuse_symlink(path, what)
    if path.is_dir():
        raise SurgeryError(f"{what} {str(path)!r} is a folder; give a file name")
    if path.exists() and not force:
        raise SurgeryError(f"{what} {str(path)!r} exists; choose another path or add --force")
    check_parent(path, what)
    return path


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path named like ``target``; on success rename it over ``target``.

    The temporary file lives in a fresh hidden folder beside the target, so a writer that
    derives more files from the name (ONNX external data: ``NAME.data``) keeps them together;
    those are moved beside the target too (``NAME.*`` replaced, any other name only if new).
    On any failure the target is left byte-identical and the temporary folder is removed.
    """
    target = Path(target)
    refuse_symlink(target, "output")
    tmp = _temp_dir(target, PARTIAL)
    try:
        yield tmp / target.name
        extra = [p for p in sorted(tmp.iterdir()) if p.name != target.name]
        for p in extra:
            dest = target.parent / p.name
            refuse_symlink(dest, "output")
            if dest.exists() and not p.name.startswith(target.name + "."):
                raise SurgeryError(f"writing {target} would replace {dest}, which surgery did not write; "
                                   "choose another folder")
        for p in extra:
            os.replace(p, target.parent / p.name)
        os.replace(tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_file(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())


# --- folders -----------------------------------------------------------------------------------


def _renameat2_exchange() -> Callable[[bytes, bytes], int] | None:
    if os.environ.get(_EXCHANGE_DISABLED_ENV) or not hasattr(os, "fsencode"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return lambda a, b: fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = _renameat2_exchange()
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system cannot: take the two-rename path
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` at ``out``; an existing ``out`` is replaced.

    With an atomic exchange, ``out`` holds the old or the new folder at every instant. Without
    one, ``out`` is briefly missing between two renames, and :func:`recover` restores the
    old folder if the run dies there.
    """
    if not out.exists():
        os.rename(new, out)
        return
    if exchange(new, out):
        shutil.rmtree(new)  # now holds the old folder; a kill here leaves a .partial- to clean up
        return
    old = _temp_dir(out, OLD)
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(out: str | Path) -> list[str]:
    """Find what a killed save left beside ``out``: restore the old folder if ``out`` is missing,
    remove partial and superseded copies. Returns one line per action (also logged)."""
    out = Path(out)
    parent = out.absolute().parent
    if not parent.is_dir():
        return []
    found = []
    for p in parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == out.name and p.is_dir() and not p.is_symlink() and not _alive(int(m["pid"])):
            found.append((m["kind"], p))
    actions = []
    for kind, p in sorted(found, key=lambda kp: kp[0] != OLD):  # restore before cleaning up
        saved = p / out.name
        try:  # another process (a DDP rank) may recover the same leftovers at the same time
            if kind == OLD and saved.is_dir() and not out.exists() and not out.is_symlink():
                os.rename(saved, out)
                actions.append(f"restored {out} from an interrupted save ({p.name})")
            else:
                actions.append(f"removed {p.name}, left by an interrupted save of {out}")
        except FileNotFoundError:
            continue
        shutil.rmtree(p, ignore_errors=True)
    for line in actions:
        log.warning(line)
    return actions
