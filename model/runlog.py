"""The run folder: the human log (train.log, echoed to stdout), the resolved config and one JSON
line per logged step or evaluation (metrics.jsonl). Only rank 0 writes."""
import json
import os
import time


class RunLog:
    def __init__(self, folder: str, is_main: bool):
        self.folder, self.is_main = folder, is_main
        if is_main:
            os.makedirs(folder, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        print(message, flush=True)
        with open(self.path("train.log"), "a") as f:
            f.write(message + "\n")

    def metric(self, **fields) -> None:
        if not self.is_main:
            return
        with open(self.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")

    def write_text(self, name: str, text: str) -> None:
        """Whole-file writes go through a temp file so a reader never sees half of one."""
        if not self.is_main:
            return
        tmp = self.path(f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path(name))
