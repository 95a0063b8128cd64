"""model/atomic.py: a file appears complete or not at all; on an OSError the old file stays, the
temp file goes, and the error is one WriteFailed line naming the file."""
import errno
import os

import pytest

from model import atomic
from model.atomic import WriteFailed, atomic_open, atomic_write


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) > 20


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_writes_the_whole_file(tmp_path):
    path = tmp_path / "out.bin"
    assert atomic_write(str(path), b"x" * 100_000) == 100_000
    assert path.read_bytes() == b"x" * 100_000
    assert atomic_write(str(path), "text\n", fsync=False) == 5  # replaces, text mode too
    assert path.read_text() == "text\n"
    with atomic_open(str(tmp_path / "parts.bin")) as f:
        f.write(b"a")
        f.write(b"b")
    assert (tmp_path / "parts.bin").read_bytes() == b"ab"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "parts.bin"]


def test_file_mode_is_what_open_gives(tmp_path):
    atomic_write(str(tmp_path / "atomic"), b"x")
    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode  # not mkstemp's 0600


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_os_error_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch, where):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")
    if where == "write":
        with pytest.raises(WriteFailed, match=rf"^could not write {path}: No space left on device; free disk space") as err:
            with atomic_open(str(path)) as f:
                f.write(b"new, half")
                raise OSError(errno.ENOSPC, "No space left on device")  # what a full disk does mid-write
    else:
        monkeypatch.setattr(os, where, fail_with(errno.ENOSPC))
        with pytest.raises(WriteFailed, match=rf"^could not write {path}: No space left on device; free disk space") as err:
            atomic_write(str(path), b"new")
        monkeypatch.undo()
    assert one_line(str(err.value))
    assert isinstance(err.value, OSError)  # callers that catch OSError still do
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_other_errors_pass_through_and_leave_nothing(tmp_path):
    path = tmp_path / "shard.bin"
    with pytest.raises(KeyError):
        with atomic_open(str(path)) as f:
            f.write(b"partial")
            raise KeyError("the caller's own bug")
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_one_line(tmp_path):
    path = tmp_path / "no" / "such" / "folder" / "config.json"
    with pytest.raises(WriteFailed, match=rf"could not write {path}: No such file or directory") as err:
        atomic_write(str(path), "{}")
    assert one_line(str(err.value))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteFailed, match=r"ro/x\.bin: Permission denied") as err:
            atomic_write(str(folder / "x.bin"), b"x")
        assert one_line(str(err.value))
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


def test_only_whole_file_modes(tmp_path):
    with pytest.raises(ValueError, match="mode 'a' must be 'wb' or 'w'"):
        with atomic_open(str(tmp_path / "x"), "a"):
            pass


def test_describe_os_error_without_strerror():
    message = atomic.describe_os_error("/runs/a/metrics.jsonl", OSError("disk went away"))
    assert message.startswith("could not write /runs/a/metrics.jsonl: disk went away;") and one_line(message)
