"""The frontier's training loader (FRONTIER.md section 3, "Batch" and "Loader"): sequential,
document-aligned rows and the document boundaries the attention needs.

The stream starts at shard 0's first BOS. Each call (one micro-step) takes world_size adjacent
spans of tokens_per_rank + 1 tokens; rank r takes span r, x = span[:-1], y = span[1:]. When the
shard cannot supply world_size more spans, its tail is dropped and the stream resumes at the next
shard's first BOS (after the last shard, the first again). No shuffling.

Next to (x, y) each call returns cu_seqlens, int32 offsets into x's B*T tokens taken row by row
(kernels.reference.check_cu_seqlens): every row start, every BOS, a cut every seq_len tokens inside
a document counted from its start within the row (the record's rule: its builder sees only the row,
so the fragment of a document the row starts inside is cut from the row start), and the end; padded
with the end to a multiple of 64 entries, so that torch.compile sees few distinct lengths.
`document_cu_seqlens` is that rule as a pure function of the tokens.

Shards are memory-mapped, checked and their BOS positions found on a background thread
(model.data.ShardPreparer), the next one as soon as the stream enters the current one, so moving
to the next shard costs a batch nothing but a slice.

x has one row of tokens_per_rank tokens (the record's layout) unless row_len is set: then rows of
row_len tokens, consecutive pieces of the span (row starts are cuts as well).
"""
import functools

import numpy as np
import torch

from model.data import ShardPreparer, open_shard, shard_paths, shard_token_count

BOS_ID = 1  # FRONTIER.md section 1: a document is [BOS] + its tokens, no EOS
CU_SEQLENS_MULTIPLE = 64  # cu_seqlens padded (with its last offset) to a multiple of this many entries


def document_cu_seqlens(
    x, seq_len: int, first_doc_offset: int = 0, bos_id: int = BOS_ID, multiple: int = CU_SEQLENS_MULTIPLE
) -> torch.Tensor:
    """int32 offsets into the tokens of x ([B, T] rows that continue one another, or [T]): row
    starts, BOS positions, a cut every seq_len tokens of a document from its start, and B*T,
    padded with B*T to a multiple of `multiple` entries (CPU tensor).

    first_doc_offset: how many tokens of the document that x starts inside precede x[0] (0 when
    x starts with a BOS or a document); its cuts fall where that document's multiples of seq_len do.
    """
    tokens = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if tokens.ndim not in (1, 2) or tokens.size == 0:
        raise ValueError(f"document_cu_seqlens: x must be a non-empty [B, T] or [T] token array, got shape {tokens.shape}")
    if seq_len <= 0 or first_doc_offset < 0 or multiple <= 0:
        raise ValueError(f"document_cu_seqlens: seq_len={seq_len} and multiple={multiple} must be positive and "
                         f"first_doc_offset={first_doc_offset} at least 0")
    row_len = tokens.shape[-1]
    total = tokens.size
    flat = tokens.reshape(-1)
    starts = np.flatnonzero(flat == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[-first_doc_offset], starts])  # the document x starts inside
    ends = np.append(starts[1:], total)
    # a document's cuts at start + k seq_len, from the first at or after x's start
    cuts = [np.arange(start if start >= 0 else start % seq_len, end, seq_len) for start, end in zip(starts, ends)]
    offsets = np.unique(np.concatenate(cuts + [np.arange(0, total, row_len), [total]]))
    padded = np.full(-(-offsets.size // multiple) * multiple, total, dtype=np.int32)
    padded[: offsets.size] = offsets
    return torch.from_numpy(padded)


def prepare_document_shard(path: str, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the shard's tokens memory-mapped and checked, the positions of its BOS tokens): the
    whole-shard work the loader leaves to the background thread."""
    tokens = open_shard(path, vocab_size)
    return tokens, np.flatnonzero(tokens == BOS_ID)


class DocumentLoader:
    """FRONTIER.md's sequential loader; next_batch, state_dict and load_state_dict as
    model.data.DistributedTokenLoader has them, but next_batch also returns cu_seqlens."""

    def __init__(self, data_path: str, rank: int = 0, world_size: int = 1, vocab_size: int | None = None,
                 row_len: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"DocumentLoader: rank {rank} must lie in [0, world_size={world_size})")
        if row_len < 0:
            raise ValueError(f"DocumentLoader: row_len={row_len} must be 0 (one row per rank) or a row length")
        self.rank, self.world_size, self.vocab_size, self.row_len = rank, world_size, vocab_size, row_len
        self.paths = shard_paths(data_path, "train")
        self.counts = [shard_token_count(p) for p in self.paths]  # every header now: a truncated shard fails at start-up
        self.shard_index, self.position = 0, None  # None: at the shard's first BOS, found when it is read
        self.shards = ShardPreparer(self.paths, self.counts, functools.partial(prepare_document_shard, vocab_size=vocab_size))

    def _next_span_start(self, span: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The shard and position where this call's world_size spans start, moving past shard
        tails (and shards without a BOS) that cannot supply them."""
        for _ in range(len(self.paths) + 1):
            if self.counts[self.shard_index]:  # an empty shard is passed without opening it
                tokens, bos = self.shards.get(self.shard_index)
                if self.position is None and bos.size:
                    self.position = int(bos[0])
                if self.position is not None and self.position + self.world_size * span <= len(tokens):
                    return tokens, bos, self.position
            self.shard_index, self.position = (self.shard_index + 1) % len(self.paths), None
        raise ValueError(f"no train shard in {self.paths[0]}'s folder holds {self.world_size} spans of {span} tokens after "
                         f"its first BOS (id {BOS_ID}); use fewer tokens per step or bigger shards")

    def next_batch(self, tokens_per_rank: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y) int64 [B, T] with B*T = tokens_per_rank (B = 1 unless row_len is set), and
        cu_seqlens (int32, see document_cu_seqlens), all on `device`. seq_len is the longest
        segment: documents are cut every seq_len tokens."""
        row_len = self.row_len or tokens_per_rank
        if seq_len <= 0 or tokens_per_rank <= 0 or tokens_per_rank % row_len:
            raise ValueError(f"next_batch: tokens_per_rank={tokens_per_rank} must be a positive multiple of the row "
                             f"length {row_len}, and seq_len={seq_len} positive")
        span = tokens_per_rank + 1
        tokens, bos, start = self._next_span_start(span)
        start += self.rank * span
        local = tokens[start:start + span].astype(np.int64)
        cu_seqlens = document_cu_seqlens(local[:-1].reshape(-1, row_len), seq_len)
        self.position += self.world_size * span
        local, cu_seqlens = _to_device(torch.from_numpy(local), device), _to_device(cu_seqlens, device)
        return local[:-1].view(-1, row_len), local[1:].view(-1, row_len), cu_seqlens

    def state_dict(self) -> dict:
        return {"shard_index": self.shard_index, "position": self.position, "num_shards": len(self.paths)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_shards") != len(self.paths):
            raise ValueError(f"loader state was saved over {state.get('num_shards')} shards but {len(self.paths)} are present; "
                             f"resume with the same DATA_PATH contents")
        index, position = int(state["shard_index"]), state["position"]
        if not 0 <= index < len(self.paths) or not (position is None or 0 <= int(position) <= self.counts[index]):
            raise ValueError(f"loader state (shard {index}, position {position}) lies outside the shards at {self.paths[0]}")
        self.shard_index, self.position = index, None if position is None else int(position)

    def close(self) -> None:
        """Drop the shards held and stop the preparing thread (the loader stays usable)."""
        self.shards.close()


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":  # pinned host memory: the copy overlaps the previous step's kernels
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
