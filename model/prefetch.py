"""A loader that reads one batch ahead in a thread, so no step waits on the host for data.

PrefetchLoader wraps any loader with next_batch(batch_tokens, seq_len, device), state_dict() and
load_state_dict() (the token stream's DistributedTokenLoader, a document loader returning
(x, y, cu_seqlens), any tuple). After handing out a batch it asks the wrapped loader for the next
one on a background thread, on the CPU, and pins it when the device is a GPU: the read, the int64
conversion and the staging all overlap the step the GPU is running; next_batch then only starts
an asynchronous host-to-device copy. The read itself never does whole-shard work: the loaders
prepare the next shard (memory-map, vocabulary check, BOS index) on their own thread as soon as
the stream enters the current one (model.data.ShardPreparer), so a shard end costs no step.

Same batches, same order, exact resume: the wrapped loader is called with the same arguments in
the same sequence as without the wrapper (a read-ahead made for other arguments is undone by
restoring the state saved before it), and state_dict() is the state before the first batch not
yet handed out, so a checkpoint resumes at the next batch the trainer would have seen.
"""
import concurrent.futures
import copy

import torch


class PrefetchLoader:
    def __init__(self, loader):
        self.loader = loader
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._ahead = None  # (arguments, future of (state before the read, host batch))

    def next_batch(self, batch_tokens: int, seq_len: int, device):
        device = torch.device(device)
        key = (batch_tokens, seq_len, device)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            _, batch = ahead[1].result()
        else:
            if ahead is not None:
                self._undo(ahead)  # read for other arguments: put the stream back where it was
            _, batch = self._read(key)
        self._ahead = (key, self._pool.submit(self._read, key))
        return type(batch)(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)

    def _read(self, key) -> tuple[dict, tuple]:
        """(the wrapped loader's state before this read, the next batch on the host, pinned for a GPU)."""
        batch_tokens, seq_len, device = key
        state = copy.deepcopy(self.loader.state_dict())
        try:
            batch = self.loader.next_batch(batch_tokens, seq_len, torch.device("cpu"))
        except BaseException:
            # A failed read (a bad shard) leaves the stream where it was; its error reaches the
            # trainer with the batch that needed that shard, not with a checkpoint's state_dict.
            self.loader.load_state_dict(state)
            raise
        if device.type == "cuda":
            batch = type(batch)(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in batch)
        return state, batch

    def _undo(self, ahead) -> None:
        if ahead[1].exception() is None:  # a failed read has put the stream back already
            self.loader.load_state_dict(ahead[1].result()[0])

    def state_dict(self) -> dict:
        """The state before the next batch next_batch will hand out."""
        if self._ahead is not None and self._ahead[1].exception() is None:
            return copy.deepcopy(self._ahead[1].result()[0])
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].exception()  # let the read finish (a failed one does not matter now) before the stream moves
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Put the unread batch back, stop the read-ahead thread and close the wrapped loader (its
        shard thread and memory maps), so no thread or file handle outlives the loader."""
        if self._ahead is not None:
            self._undo(self._ahead)
            self._ahead = None
        self._pool.shutdown(wait=True)
        if hasattr(self.loader, "close"):
            self.loader.close()
