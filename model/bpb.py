"""Bytes per token from the SentencePiece tokenizer, and bits per byte (SPEC.md "Evaluation").

bpb = (sum of target NLL in nats / ln 2) / (UTF-8 bytes of the scored targets). The byte count of
a target depends only on the target id and the id before it, so it is read from three look-up
tables indexed by token id:
  base_bytes[id]          byte tokens (<0xNN>) count 1; control / unknown / unused pieces count 0;
                          any other piece counts the UTF-8 length of its text without a leading "▁"
  has_leading_space[id]   the piece starts with "▁" (one more byte: the space) ...
  is_boundary[id]         ... unless the previous token is a control / unknown / unused piece
                          (BOS starts every document, and the text has no space before it)
The tokenizer's normaliser collapses runs of whitespace, so the count is the UTF-8 length of the
text the tokens decode to, which for most documents is their raw text.

When the validation shards have byte sidecars (fineweb_val_bytes_*.bin, FRONTIER.md section 1: the
CaseOps data, whose tokens spell a transformed text), a target's bytes are instead read from the
sidecar at the target's position: SidecarBytes. Evaluation takes either kind as its byte source
(validation_byte_source picks one, describe_byte_source says which for the log).
"""
import math
import os
from typing import NamedTuple, Union

import torch

LEADING_SPACE = "\u2581"  # "▁", SentencePiece's visible space

ByteLuts = tuple  # (base_bytes int16 [V], has_leading_space bool [V], is_boundary bool [V])


class SidecarBytes(NamedTuple):
    """Bytes per validation token from the sidecars: token_bytes[i] = UTF-8 bytes of the original
    text that token i covers (BOS 0); int32 [N], aligned with the validation tokens."""

    token_bytes: torch.Tensor


ByteSource = Union[ByteLuts, SidecarBytes]


def load_tokenizer(path: str, vocab_size: int):
    """The SentencePiece model at `path`, checked to be one and to have exactly `vocab_size` pieces."""
    from model.data import open_sentencepiece

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {path} not found; download it with data/download.py or set TOKENIZER_PATH to the .model file"
        )
    sp = open_sentencepiece(path)
    pieces = int(sp.vocab_size())
    if pieces != vocab_size:
        raise ValueError(
            f"tokenizer {path} has {pieces} pieces but VOCAB_SIZE={vocab_size}; "
            f"use the tokenizer the shards were made with or set VOCAB_SIZE={pieces}"
        )
    return sp


def build_byte_luts(sp, vocab_size: int, device="cpu") -> ByteLuts:
    """(base_bytes int16 [V], has_leading_space bool [V], is_boundary bool [V]) for ids < vocab_size.

    Ids the tokenizer does not have (vocab_size larger than its piece count) are boundary
    tokens worth 0 bytes, like control pieces: a model never should emit them as targets.
    """
    base_bytes = torch.zeros(vocab_size, dtype=torch.int16)
    has_leading_space = torch.zeros(vocab_size, dtype=torch.bool)
    is_boundary = torch.ones(vocab_size, dtype=torch.bool)
    for token_id in range(min(vocab_size, int(sp.vocab_size()))):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue  # boundary, 0 bytes
        is_boundary[token_id] = False
        if sp.is_byte(token_id):
            base_bytes[token_id] = 1  # one raw byte of a UTF-8 sequence (byte fallback)
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(LEADING_SPACE):
            has_leading_space[token_id] = True
            piece = piece[len(LEADING_SPACE):]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return base_bytes.to(device), has_leading_space.to(device), is_boundary.to(device)


def target_bytes(prev_ids: torch.Tensor, target_ids: torch.Tensor, luts: ByteLuts) -> torch.Tensor:
    """UTF-8 bytes of each target (int32, the shape of target_ids); prev_ids[i] precedes target_ids[i]."""
    base_bytes, has_leading_space, is_boundary = luts
    space = has_leading_space[target_ids] & ~is_boundary[prev_ids]
    return base_bytes[target_ids].to(torch.int32) + space.to(torch.int32)


def validation_byte_source(data_path: str, num_tokens: int, luts: ByteLuts) -> ByteSource:
    """The byte source evaluation should use for the validation tokens of data_path (num_tokens =
    the numel() of load_validation_tokens' result): the sidecars when the folder has them, on the
    device of `luts`, else `luts` itself."""
    from model.data import load_validation_bytes

    token_bytes = load_validation_bytes(data_path, num_tokens)
    return luts if token_bytes is None else SidecarBytes(token_bytes.to(luts[0].device))


def describe_byte_source(source: ByteSource) -> str:
    """One phrase for the run log: which byte source scores bits per byte."""
    if isinstance(source, SidecarBytes):
        return f"sidecar fineweb_val_bytes_*.bin ({int(source.token_bytes.sum()):,} bytes over {source.token_bytes.numel():,} tokens)"
    return "tokenizer byte tables"


def check_byte_source(source: ByteSource, num_tokens: int) -> None:
    """One ValueError line when `source` is neither kind, or a sidecar not aligned with the tokens."""
    if isinstance(source, SidecarBytes):
        if source.token_bytes.dim() != 1 or source.token_bytes.numel() != num_tokens:
            raise ValueError(
                f"the byte sidecar holds {tuple(source.token_bytes.shape)} counts for {num_tokens:,} validation tokens; "
                "load both from one folder (model.data.load_validation_bytes(data_path, tokens.numel()))"
            )
        return
    if not isinstance(source, tuple) or len(source) != 3:
        raise ValueError("the byte source must be (base_bytes, has_leading_space, is_boundary) from model.bpb.build_byte_luts or a model.bpb.SidecarBytes")


def byte_source_to(source: ByteSource, device) -> ByteSource:
    if isinstance(source, SidecarBytes):
        return SidecarBytes(source.token_bytes.to(device))
    return tuple(t.to(device) for t in source)


def scored_bytes(source: ByteSource, inputs: torch.Tensor, targets: torch.Tensor, target_positions: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes of each target (int32, the shape of targets): from the sidecar at the targets'
    positions in the validation stream, or from the tokenizer tables by (previous id, id)."""
    if isinstance(source, SidecarBytes):
        return source.token_bytes[target_positions].to(torch.int32)
    return target_bytes(inputs, targets, source)


def bits_per_byte(nll_sum_nats: float, byte_count: float) -> float:
    """Summed NLL in nats over the targets -> bits per UTF-8 byte of those targets."""
    if byte_count <= 0:
        raise ValueError(f"cannot compute bits per byte over {byte_count} bytes; score at least one non-empty target")
    return float(nll_sum_nats) / math.log(2.0) / float(byte_count)
