"""Files that a crash, a kill or a full disk cannot leave half-written.

Every whole-file writer of the project (checkpoints, the artifact, shards, config.json, the record)
goes through `atomic_open`: the bytes go to a temp file beside the target, are flushed to disk,
and only then renamed over it, so a reader sees the old file or the new one, never a torn one.
An OSError on the way (disk full, permission, a vanished folder) becomes one `WriteFailed` line
naming the file, and the temp file is removed.
"""
import contextlib
import os
import tempfile

# mkstemp makes 0600 files; a renamed-in file should get the mode open() would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteFailed(OSError):
    """A file could not be written; the message names it and says what to do."""


def describe_os_error(path: str, error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"could not write {path}: {reason}; free disk space or fix the folder's permissions, then run again"


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", fsync: bool = True):
    """`with atomic_open(path) as f: f.write(...)`: path appears complete or not at all."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} must be 'wb' or 'w'")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except WriteFailed:
        raise
    except OSError as e:
        raise WriteFailed(describe_os_error(path, e)) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: bytes | str, fsync: bool = True) -> int:
    """Write all of `data` to path atomically; returns the number of bytes or characters written."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)
    return len(data)
