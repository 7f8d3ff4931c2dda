"""Writing files so that a kill, a second process or a planted link never corrupts anything.

- Temporary files and folders are created exclusively (O_EXCL, random names) in the folder of
  their destination and renamed over it: a link planted at a predictable temporary name is never
  followed, and a reader sees the old file or the new one, never half of one.
- A run takes an exclusive lock on its output folder (`OUT/.lock`, fcntl.flock) for its whole life;
  a second run into the same folder is refused with the first one's process id.
"""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fastgpt.errors import FastGPTError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs into one folder are not guarded there
    fcntl = None

LOCK = ".lock"


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a new temporary file beside path for writing (binary); on success it replaces path.

    The temporary file is created with O_EXCL under a random name, so no existing file or link is
    ever opened; os.replace swaps the name `path` itself (a link there is replaced, not followed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; a plain file follows the umask
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder in parent with a random name after prefix, created exclusively."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    folder.chmod(0o777 & ~umask())  # mkdtemp makes 0700; a plain folder follows the umask
    return folder


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace path's contents with data (text as UTF-8) in one atomic step."""
    with replacing(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to path (created if missing); a link at path is refused (O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


def writable_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the folder path if needed and check that files can be created in it.

    Raises FastGPTError with one sentence when path is a file, lies under a file, or is read-only.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FastGPTError(f"{option} {path} is a file, not a folder; give a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FastGPTError(
            f"{option} {path} cannot be created: a part of the path is a file, not a folder."
        ) from None
    except PermissionError:
        raise FastGPTError(f"{option} {path} cannot be created: permission denied.") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
    except OSError as e:
        raise FastGPTError(
            f"{option} {path} is not writable ({e.strerror}); give a folder you can write to."
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


class FolderLock:
    """An exclusive lock on a folder for a run's life: `with FolderLock(out): ...`.

    The lock file OUT/.lock holds the owner's process id, so a refused run can say who holds it.
    The kernel drops the lock when the owner exits, however it exits (kill -9 included).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise FastGPTError(f"Cannot open the lock file {self.path}: {e.strerror}.") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FastGPTError(
                    f"{self.path.parent} is in use by another run (process {holder}); wait for "
                    "it to finish, or give another --out."
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
