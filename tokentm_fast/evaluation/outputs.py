"""Writing output files safely: never through a symbolic link, never half-written, never twice at once.

Every file the command line and the evaluation runner write (overlays, grids,
the results JSON, the curves plot, the resumable state, ``--save-maps``) goes
through :func:`open_output` (or :func:`write_bytes` / :func:`write_json`):

* an existing symbolic link at the target is refused with an
  :class:`OutputError` naming the file and the option (the link could lead out
  of the output folder: ``o/a.png_tokentm.png -> /home/me/.bashrc``);
* the content goes to a temporary file created in the same folder with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a fresh file: it cannot be a link, nor an
  existing file), is flushed (and fsync'ed for the files a run depends on), and
  ``os.replace`` moves it over the target (a rename replaces a directory entry,
  it never writes through a link);
* any ``OSError`` on the way (a full disk: ``ENOSPC``, no permission...)
  removes the temporary file, leaves the target as it was (the last good
  state stays intact) and is raised again as an :class:`OutputError` whose
  message names the file and the option.

The checks made before any work (:func:`check_output_dir`,
:func:`check_output_file`, :func:`output_inside`, :func:`check_no_link`)
refuse an output location that cannot be used (a file where a folder is
expected, a folder that is not writable, a name leading out of its output
folder, a symbolic link) with an :class:`OutputLocationError` naming the option,
so that a command fails before it loads a model; :func:`check_not_overwriting`
refuses an existing file that only an explicit flag (``--overwrite``) may replace.

:class:`OutputLock` is an exclusive, non-blocking ``fcntl.flock`` on
``<output>.lock``: a second ``evaluate`` on the same ``--output`` stops at
once and says which process (pid, host, start time) holds it. The lock is
released when the process ends, however it ends (the kernel drops it), so a
killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Dict, Iterator, Optional, Union

__all__ = ["OutputError", "OutputLocationError", "refuse_link", "open_output", "write_bytes", "write_text",
           "write_json", "check_no_link", "check_output_dir", "check_output_file", "check_not_overwriting",
           "output_inside", "OutputLock", "lock_path"]

PathLike = Union[str, os.PathLike]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputError(OSError):
    """An output file cannot be written (a link at its place, a full disk, no permission, a lock held).

    The message names the file and the option it came from; ``errno`` is the
    underlying error number when there is one.
    """

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


def _opt(option: Optional[str]) -> str:
    return f" ({option})" if option else ""


def refuse_link(path: PathLike, option: Optional[str] = None, what: str = "output file") -> Path:
    """``Path(path)``; an :class:`OutputError` if a symbolic link (even a dangling one) is there."""
    p = Path(path)
    if p.is_symlink():
        try:
            to = f" to {os.readlink(p)}"
        except OSError:
            to = ""
        raise OutputError(
            f"the {what} {p}{_opt(option)} is a symbolic link{to}; refusing to write through it (it could lead "
            f"out of its folder): remove the link or choose another name", errno.ELOOP)
    return p


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device (the disk is full)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e) or type(e).__name__


def _write_error(p: Path, option: Optional[str], what: str, e: OSError) -> OutputError:
    return OutputError(
        f"cannot write the {what} {p}{_opt(option)}: {_reason(e)} [errno {e.errno}]; {p.name} was left as it "
        "was and the temporary file was removed", e.errno)


def _create_temporary(folder: Path, name: str) -> "tuple[int, Path]":
    """A new file ``.<name>.<pid>.<random>.tmp`` in ``folder`` (``O_EXCL | O_NOFOLLOW``: never an existing one)."""
    for _ in range(64):
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:  # taken (a file or a link): draw another name
            continue
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder / f".{name}.*.tmp"))


def _write(f: IO[bytes], data: bytes) -> None:
    """The one place the helpers write bytes (tests inject a full disk here)."""
    f.write(data)


@contextmanager
def open_output(path: PathLike, option: Optional[str] = None, what: str = "output file",
                durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` when the ``with`` block ends without error.

    Refuses a symbolic link at ``path`` (before and again just before the
    rename); creates missing parent folders. ``durable``: fsync the data
    before the rename (the resumable state and the results; pictures skip it).
    On an error the temporary file is removed and ``path`` is untouched; an
    ``OSError`` becomes an :class:`OutputError` naming ``path`` and ``option``.
    """
    p = refuse_link(path, option, what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temporary(p.parent, p.name)
    except OSError as e:
        raise _write_error(p, option, what, e) from None
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        refuse_link(p, option, what)  # a link put there while we wrote is refused too
        os.replace(tmp, p)
        done = True
    except OutputError:
        raise
    except OSError as e:
        raise _write_error(p, option, what, e) from None
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_bytes(path: PathLike, data: bytes, option: Optional[str] = None, what: str = "output file",
                durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through :func:`open_output`; returns the path."""
    with open_output(path, option, what, durable) as f:
        _write(f, data)
    return Path(path)


def write_text(path: PathLike, text: str, option: Optional[str] = None, what: str = "output file",
               durable: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` through :func:`open_output`."""
    return write_bytes(path, text.encode("utf-8"), option, what, durable)


def write_json(path: PathLike, obj: Any, option: Optional[str] = None, what: str = "output file") -> Path:
    """Write ``obj`` as JSON (no NaN) to ``path`` through :func:`open_output`, fsync'ed."""
    return write_text(path, json.dumps(obj, indent=1, allow_nan=False), option, what, durable=True)


# ----------------------------------------------------------------------------
# the checks of an output location, before any work
# ----------------------------------------------------------------------------

class OutputLocationError(OutputError):
    """An output location refused before any work; the message names the path and the option.

    Every process of a ``torchrun`` run checks the same locations and meets the
    same refusal (``every_rank``): the command line lets rank 0 alone say it.
    """

    every_rank: bool = True


def check_no_link(path: PathLike, option: str, what: str = "output file") -> Path:
    """:func:`refuse_link` before any work: a symbolic link at ``path`` is an :class:`OutputLocationError`.

    (The writers refuse it again when they write: :func:`open_output`.)
    """
    try:
        return refuse_link(path, option, what)
    except OutputError as e:
        raise OutputLocationError(str(e), e.errno) from None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist: the nearest existing ancestor must be a writable folder."""
    anc = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not anc.is_dir():
        raise OutputLocationError(f"{option} {path}: cannot create it, {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputLocationError(f"{option} {path}: cannot create it, the folder {anc} is not writable")


def check_output_dir(path: PathLike, option: str) -> Path:
    """Check, before any work, that the output folder ``path`` of ``option`` can be used.

    A missing folder (and missing parents) is fine: it is created when the
    results are written. Refused, with an :class:`OutputLocationError` naming
    ``option``: an existing file, a path below a file, a folder that is not
    writable.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise OutputLocationError(f"{option} {p} is an existing file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputLocationError(f"{option} {p}: the folder is not writable")
    else:
        _check_creatable(p, option)
    return p


def check_output_file(path: PathLike, option: str) -> Path:
    """Check, before any work, that the output file ``path`` of ``option`` can be written.

    Missing parent folders are created when the file is written. Refused, with
    an :class:`OutputLocationError` naming ``option``: a symbolic link, an
    existing folder, a path below a file, a location that is not writable.
    """
    p = check_no_link(path, option)
    if p.is_dir():
        raise OutputLocationError(f"{option} {p} is an existing folder, expected a file name")
    if p.exists():
        if not os.access(p, os.W_OK) or not os.access(p.parent if str(p.parent) else Path("."), os.W_OK | os.X_OK):
            raise OutputLocationError(f"{option} {p}: the file or its folder is not writable")
    else:
        _check_creatable(p, option)
    return p


def check_not_overwriting(path: PathLike, option: str, flag: str = "--overwrite", what: str = "file",
                          hint: str = "") -> Path:
    """Refuse, before any work, to replace the existing file ``path`` of ``option`` unless ``flag`` was given.

    Call it only when ``flag`` was not given. The :class:`OutputLocationError` names the file, the
    option and ``flag``; ``hint`` (a sentence) is appended.
    """
    p = Path(path)
    if p.is_file():
        raise OutputLocationError(
            f"{option} {p} already exists ({what}); refusing to overwrite it: add {flag} to replace it, or "
            f"choose another {option}" + (f". {hint}" if hint else ""))
    return p


def output_inside(folder: Path, name: str, option: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder`` (no ``..``, no absolute path, no link out).

    Every file a command writes lies in its output folder; a name given on the
    command line must not escape it (``--grid-name ../../x.png``).
    """
    if not name or name in (".", ".."):
        raise OutputLocationError(f"{option} must name a file inside the output folder, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts:
        raise OutputLocationError(f"{option} {name!r} must be a file name inside the output folder {folder} "
                                  f"(no absolute path, no '..')")
    target = folder / rel
    check_no_link(target, option)  # a link at the file itself: said as such
    base = folder.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise OutputLocationError(f"{option} {name!r} leads outside the output folder {folder} (through a link)")
    if resolved == base or target.is_dir():
        raise OutputLocationError(f"{option} {name!r} is a folder, expected a file name")
    return target


# ----------------------------------------------------------------------------
# the lock of an output
# ----------------------------------------------------------------------------

def lock_path(output: PathLike) -> Path:
    """The lock file of ``output``: ``<output>.lock``."""
    return Path(str(output) + ".lock")


def _holder(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        d: Dict[str, Any] = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        d = {}
    if not d.get("pid"):
        return "another process (it has not written its pid yet)"
    started = f", started {d['started']}" if d.get("started") else ""
    return f"process {d['pid']} on host {d.get('host', '?')}{started}"


class OutputLock:
    """An exclusive, non-blocking lock of ``output`` (``fcntl.flock`` on ``<output>.lock``).

    ``acquire()`` raises an :class:`OutputError` naming the holder (pid, host,
    start time) when another process has it; ``release()`` removes the lock
    file and drops the lock. Where ``fcntl`` does not exist (Windows) or the
    file system does not support locks, nothing is locked and ``acquired`` is
    False.
    """

    def __init__(self, output: PathLike, option: Optional[str] = "--output", what: str = "results") -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.option = option
        self.what = what
        self.fd: Optional[int] = None
        self.unsupported: Optional[str] = None

    @property
    def acquired(self) -> bool:
        return self.fd is not None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            self.unsupported = "fcntl is not available on this system"
            return self
        refuse_link(self.path, self.option, "lock file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.path, self.option, "lock file", e) from None
        for _ in range(64):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    refuse_link(self.path, self.option, "lock file")
                raise OutputError(f"cannot create the lock file {self.path}{_opt(self.option)}: {_reason(e)}",
                                  e.errno) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _holder(fd)
                    os.close(fd)
                    raise OutputError(
                        f"another evaluation is writing {self.output}{_opt(self.option)}: {holder} holds the "
                        f"lock {self.path}. Wait for it to finish (the same command then resumes or finds the "
                        f"results), or choose another {self.option or 'output'}", errno.EWOULDBLOCK) from None
                os.close(fd)
                self.unsupported = f"the file system does not support locks ({_reason(e)})"
                return self
            # the file may have been removed (and maybe re-created) by the holder between open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
            except OSError:  # the lock holds without its description
                pass
            self.fd = fd
            return self
        raise OutputError(f"cannot take the lock {self.path}{_opt(self.option)}: it keeps being replaced")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.stat(self.path, follow_symlinks=False)):
                os.unlink(self.path)  # still ours: remove it while we hold the lock
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
