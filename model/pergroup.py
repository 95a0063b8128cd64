"""The per-group container (COMPRESSOR=pergroup, FRONTIER.md section 4 "Serialiser").

The int8 codes of the quantised matrices are split by role into seven groups, in this order:
tok_emb, c_k, c_q, c_v, attention proj, MLP fc, MLP proj (each: that name's q tensors, layers in
ascending order). In the hot groups (tok_emb, c_q, fc) each tensor's rows are reordered by a
greedy L1 nearest-neighbour chain (start at row 0, then always the unused row nearest in L1 to
the last one, ties to the lowest index), so similar rows sit together; the permutations are kept
as uint16. Every 2-D tensor is written transposed (column-major), and each group's bytes are
coded on their own, in parallel threads (brotli or zstd; lrzip when asked for and on PATH).

Everything else (scales, fp16 tensors, ungrouped int8 such as LQER factors and gate codes, the
header with every name, dtype and shape) is the remainder: model.export's own serialiser (no
pickle in the reader, unlike the record's torch.save) coded with brotli q11 / window 2^24. The
permutations (group, then layer order) are brotli-coded too (empty when there are none).

Container: b"PGRP" | uint32 n = 9 | n uint32 stream lengths | 7 group streams (possibly empty),
the remainder, the permutations. All integers little-endian. Reading decodes the streams in
parallel threads (zstd and brotli release the GIL).
"""
import re
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy
import torch

from model import compressors
from model.gptq import single_threaded_on_cpu

MAGIC = b"PGRP"
GROUPS = (  # (name, pattern of its tensors' state-dict names, rows reordered)
    ("tok_emb", r"tok_emb\.weight", True),
    ("c_k", r"blocks\.(\d+)\.attn\.c_k\.weight", False),
    ("c_q", r"blocks\.(\d+)\.attn\.c_q\.weight", True),
    ("c_v", r"blocks\.(\d+)\.attn\.c_v\.weight", False),
    ("attn_proj", r"blocks\.(\d+)\.attn\.proj\.weight", False),
    ("mlp_fc", r"blocks\.(\d+)\.mlp\.fc\.weight", True),
    ("mlp_proj", r"blocks\.(\d+)\.mlp\.proj\.weight", False),
)
NUM_STREAMS = len(GROUPS) + 2
EXACT_FP32_L1_MAX = 2**24  # L1 distances of int8 rows are exact in fp32 while below this
DISTANCE_CHUNK_ELEMENTS = 1 << 26  # rows of the distance matrix computed at a time: chunk x n x d elements


# --------------------------------------------------------------------------- the similarity order


def l1_chain(rows: torch.Tensor, device=None) -> torch.Tensor:
    """Greedy L1 nearest-neighbour order of rows [n, d] (or [L, n, d], each layer on its own) -> [n] / [L, n] int64.

    Starts at row 0 and appends the unused row nearest in L1 to the last one, ties to the lowest
    index. The n x n distance matrix is built in row chunks with torch.cdist (exact: integer rows,
    fp32 below 2^24, else fp64), on `device` (default: the GPU when there is one); then one
    vectorised argmin per chain step, batched over the layers.
    """
    single = rows.dim() == 2
    X = rows[None] if single else rows
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    L, n, d = X.shape
    span = int(X.abs().amax()) * 2 if X.numel() else 0
    dtype = torch.float32 if span * d < EXACT_FP32_L1_MAX else torch.float64
    X = X.to(device=device, dtype=dtype)
    D = torch.empty(L, n, n, device=device, dtype=dtype)
    chunk = max(1, DISTANCE_CHUNK_ELEMENTS // max(1, n * d * L))
    for i in range(0, n, chunk):
        D[:, i : i + chunk] = torch.cdist(X[:, i : i + chunk], X, p=1)
    order = torch.zeros(L, n, dtype=torch.long, device=device)
    used = torch.zeros(L, n, dtype=torch.bool, device=device)
    layers = torch.arange(L, device=device)
    last = torch.zeros(L, dtype=torch.long, device=device)
    used[:, 0] = True
    with single_threaded_on_cpu(device):
        for step in range(1, n):
            distance = D[layers, last].masked_fill(used, float("inf"))  # [L, n]
            last = distance.argmin(dim=1)  # the first minimum: ties go to the lowest index
            order[:, step] = last
            used[layers, last] = True
    order = order.cpu()
    return order[0] if single else order


# --------------------------------------------------------------------------- payload <-> container


def grouped_names(payload: dict) -> list[list[str]]:
    """For each group, the names of the payload entries whose int8 "q" it holds, in layer order."""
    groups = []
    for _, pattern, _ in GROUPS:
        members = []
        for name, entry in payload["tensors"].items():
            match = re.fullmatch(pattern, name)
            q = entry.get("q")
            if match and q is not None and q.dtype == torch.int8 and q.dim() == 2:
                members.append((int(match.group(1)) if match.groups() else 0, name))
        groups.append([name for _, name in sorted(members)])
    return groups


def pack(payload: dict, coder: str = "brotli", *, zstd_level: int = 22, device=None) -> bytes:
    """A payload (model.export's quantised form) -> the PGRP container bytes."""
    from model.export import serialize

    groups = grouped_names(payload)
    raw_groups, permutations, permuted = [], [], []
    for (_, _, hot), names in zip(GROUPS, groups):
        parts = []
        if hot and names:
            rows = {tuple(payload["tensors"][name]["q"].shape) for name in names}
            if max(shape[0] for shape in rows) > 65535:
                raise ValueError(f"pergroup: a tensor of {names[0]}'s group has over 65,535 rows; "
                                 f"its permutation does not fit uint16; use COMPRESSOR=brotli")
            orders = {}
            for shape in rows:  # one batched chain per shape (the layers of one group share it)
                same = [name for name in names if tuple(payload["tensors"][name]["q"].shape) == shape]
                chain = l1_chain(torch.stack([payload["tensors"][name]["q"] for name in same]), device=device)
                orders.update(zip(same, chain))
        for name in names:
            q = payload["tensors"][name]["q"]
            if hot:
                order = orders[name]
                q = q[order]
                permutations.append(order.numpy().astype("<u2").tobytes())
                permuted.append(name)
            parts.append(q.T.contiguous().numpy().tobytes())
        raw_groups.append(b"".join(parts))

    grouped = {name for names in groups for name in names}
    rest = {"format": payload["format"], "tensors": {}, "meta": dict(payload.get("meta", {}))}
    for name, entry in payload["tensors"].items():
        if name in grouped:
            entry = {k: v for k, v in entry.items() if k != "q"}
        rest["tensors"][name] = entry
    # in group order, not the set's: a set of strings iterates in a per-process hash order, and the
    # artifact's bytes must not depend on the process that wrote them
    q_shapes = {name: list(payload["tensors"][name]["q"].shape) for names in groups for name in names}
    rest["meta"]["pergroup"] = dict(groups=groups, permuted=permuted, q_shapes=q_shapes)
    jobs = [(raw, coder) for raw in raw_groups] + [(serialize(rest), "brotli"), (b"".join(permutations), "brotli")]
    with ThreadPoolExecutor(max_workers=NUM_STREAMS) as pool:  # the coders release the GIL: one core per stream
        streams = list(pool.map(lambda job: compressors.encode(job[0], job[1], zstd_level=zstd_level) if job[0] else b"", jobs))
    header = MAGIC + struct.pack(f"<I{NUM_STREAMS}I", NUM_STREAMS, *(len(s) for s in streams))
    return header + b"".join(streams)


def unpack(blob: bytes) -> dict:
    """PGRP container bytes -> the payload `pack` was given (bit-exact); ValueError when they are not one."""
    from model.export import deserialize

    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4 * (NUM_STREAMS + 1):
        raise ValueError("it is not a PGRP container (magic or header missing)")
    count, *lengths = struct.unpack_from(f"<I{NUM_STREAMS}I", blob, len(MAGIC))
    if count != NUM_STREAMS:
        raise ValueError(f"its PGRP header says {count} streams, this code reads {NUM_STREAMS}")
    offset, streams = len(MAGIC) + 4 * (NUM_STREAMS + 1), []
    for length in lengths:
        streams.append(blob[offset : offset + length])
        offset += length
    if offset != len(blob):
        raise ValueError(f"its streams cover {offset:,} bytes of {len(blob):,} (truncated or extended)")
    with ThreadPoolExecutor(max_workers=NUM_STREAMS) as pool:
        raws = list(pool.map(lambda s: compressors.decode(s) if s else b"", streams))
    rest = deserialize(raws[len(GROUPS)])
    layout = rest["meta"].pop("pergroup")
    if not rest["meta"]:
        del rest["meta"]
    perm_raw, perm_offset = raws[len(GROUPS) + 1], 0
    permuted = set(layout["permuted"])
    for raw, names in zip(raws, layout["groups"]):
        start = 0
        for name in names:
            entry = rest["tensors"][name]
            rows, cols = layout["q_shapes"][name]
            stored = torch.frombuffer(bytearray(raw[start : start + rows * cols]), dtype=torch.int8)
            start += rows * cols
            q = stored.reshape(cols, rows).T.contiguous()
            if name in permuted:
                order = numpy.frombuffer(perm_raw, dtype="<u2", count=rows, offset=perm_offset).astype(numpy.int64)
                perm_offset += 2 * rows
                restored = torch.empty_like(q)
                restored[torch.from_numpy(order)] = q
                q = restored
            entry["q"] = q
        if start != len(raw):
            raise ValueError("a group stream's length does not match its tensors' shapes")
    return rest
