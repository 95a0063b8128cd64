"""The run folder: the human log (train.log, echoed to stdout), the resolved config and one JSON
line per logged step or evaluation (metrics.jsonl). Only rank 0 writes.

Each log line goes to the file in one append-mode write, so a kill leaves whole lines and at most
a torn last one (which model.submission.read_metrics skips). An OSError (disk full, permissions)
is one WriteFailed line naming the file."""
import json
import os
import time

from model.atomic import WriteFailed, atomic_write, describe_os_error

LOG_FILES = ("train.log", "metrics.jsonl")


class RunLog:
    def __init__(self, folder: str, is_main: bool):
        self.folder, self.is_main = folder, is_main
        if is_main:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise WriteFailed(describe_os_error(folder, e)) from e
            for name in LOG_FILES:
                self._end_torn_line(name)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _end_torn_line(self, name: str) -> None:
        """A run killed mid-write may have left a line without its newline; end it, so the lines a
        resumed run appends are not glued onto it (the reader then skips just that one line)."""
        path = self.path(name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            return
        try:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                whole = f.read(1) == b"\n"
        except OSError as e:
            raise WriteFailed(describe_os_error(path, e)) from e
        if not whole:
            self._append(name, "\n")

    def _append(self, name: str, text: str) -> None:
        """One os.write of the whole text on an O_APPEND descriptor (loops only on a short write)."""
        path, data = self.path(name), text.encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
        except OSError as e:
            raise WriteFailed(describe_os_error(path, e)) from e

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        print(message, flush=True)
        self._append("train.log", message + "\n")

    def metric(self, **fields) -> None:
        if not self.is_main:
            return
        self._append("metrics.jsonl", json.dumps({"time": round(time.time(), 3), **fields}) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """A whole file, atomically: a reader sees the old one or the new one, never half of one."""
        if not self.is_main:
            return
        atomic_write(self.path(name), text)
