"""Turn text documents into token shards of the challenge's format.

    python data/prepare.py --input docs.jsonl --out data/datasets/mine --tokenizer m.model
    python data/prepare.py --input notes.txt --out folder --tokenizer new.model --train-tokenizer --vocab-size 1024

Input: JSONL (one {"text": ...} object per line) or plain text (documents separated by blank lines,
or one per line with --one-doc-per-line). Output, like the official export: every document is
BOS + its SentencePiece ids (no EOS), the first --val-docs documents go to the validation split
(the challenge scores the first 50,000 FineWeb documents), the rest to training, and the token
stream of each split is cut into shards of exactly --shard-tokens tokens (the last one shorter;
a document may straddle two shards), named fineweb_{val,train}_{i:06d}.bin.

Beside the shards goes tokenizer.json (the tokenizer's name, sha256 and piece count), which
model.data.check_tokenizer_matches reads so that a run with another tokenizer stops at start-up.

CaseOps (--caseops; FRONTIER.md section 1): each document goes through data/caseops.encode before
SentencePiece, and every validation shard gets a byte sidecar fineweb_val_bytes_NNNNNN.bin (the
shard format, one uint16 per token: the UTF-8 bytes of the ORIGINAL text the token covers; BOS 0),
from which evaluation counts bytes. With --train-tokenizer the tokenizer gets the record's settings:
the four operators as user-defined symbols (ids 4-7) and no hard vocabulary limit.

    python data/prepare.py --caseops --input docs_selected.jsonl --out data/datasets/fineweb10B_sp8192_caseops \
        --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model

Documents are encoded by a pool of --workers processes (default: every core), in chunks, in order;
progress goes to stderr every few seconds.

Python API (the smoke preset uses it): `prepare(documents, out_dir, tokenizer_path, val_docs,
shard_tokens, caseops=False, workers=1) -> dict`, `train_tokenizer(documents, model_path,
vocab_size, caseops=False)` and `encode_document(sp, text, caseops, with_bytes)`.
"""
import argparse
import collections
import glob
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import caseops  # noqa: E402
from model.atomic import WriteFailed, describe_os_error  # noqa: E402
from model.data import TOKENIZER_MANIFEST, open_sentencepiece, write_shard, write_tokenizer_manifest  # noqa: E402

SHARD_PATTERN = "fineweb_{split}_{index:06d}.bin"  # split "val_bytes" names the byte sidecars
CHUNK_DOCS = 64  # documents per task of the worker pool
PROGRESS_EVERY_S = 10.0
SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES = 4192
MAX_PIECE_BYTES = 2**16 - 1  # a sidecar entry is a uint16


class DataPrepError(ValueError):
    """Bad input to the data tools; the message is one sentence a user can act on."""


# -- reading documents ----------------------------------------------------------------------------


def read_documents(path: str, text_format: str = "auto", one_doc_per_line: bool = False) -> Iterator[str]:
    """Documents of a .jsonl file ({"text": ...} per line) or a text file, lazily, in file order.

    text_format: "auto" (by extension: .jsonl/.ndjson are JSONL, anything else text), "jsonl", "txt".
    Text files: documents are blocks separated by blank lines (the lines of a block are joined with
    "\\n"), or each non-empty line when one_doc_per_line.
    """
    if not os.path.isfile(path):
        raise DataPrepError(f"input file {path} does not exist; pass an existing .jsonl or .txt file with --input")
    if text_format == "auto":
        text_format = "jsonl" if path.lower().endswith((".jsonl", ".ndjson")) else "txt"
    if text_format not in ("jsonl", "txt"):
        raise DataPrepError(f"unknown input format {text_format!r}; use 'jsonl', 'txt' or 'auto'")
    lines = _read_lines(path)
    if text_format == "jsonl":
        return _jsonl_documents(path, lines)
    return _line_documents(lines) if one_doc_per_line else _block_documents(lines)


def _read_lines(path: str) -> Iterator[tuple[int, str]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataPrepError(f"cannot read input file {path}: {e.strerror}; check its permissions") from None
    with f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataPrepError(f"{path} line {line_number}: not UTF-8 text ({e.reason}); convert the file to UTF-8") from None
            yield line_number, line.rstrip("\r\n")


def _jsonl_documents(path: str, lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    for line_number, line in lines:
        if not line.strip():
            continue  # tolerate blank lines (a trailing newline at the end, for example)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataPrepError(f"{path} line {line_number}: not valid JSON ({e.msg}); each line must be one object like {{\"text\": \"...\"}}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataPrepError(f"{path} line {line_number}: no \"text\" field; each line must be one object like {{\"text\": \"...\"}}")
        if not isinstance(record["text"], str):
            raise DataPrepError(f"{path} line {line_number}: \"text\" is a {type(record['text']).__name__}, not a string; store each document's text as a JSON string")
        yield record["text"]


def _line_documents(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    for _, line in lines:
        if line.strip():
            yield line


def _block_documents(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    block: list[str] = []
    for _, line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


# -- tokenizer ------------------------------------------------------------------------------------


def load_tokenizer(tokenizer_path: str):
    """A SentencePieceProcessor for a .model file, with a clear error when it is missing or bad."""
    if not os.path.isfile(tokenizer_path):
        raise DataPrepError(
            f"tokenizer {tokenizer_path} does not exist; pass a SentencePiece .model file with --tokenizer "
            "(or add --train-tokenizer to train one)"
        )
    try:
        return open_sentencepiece(tokenizer_path)
    except ValueError as e:
        raise DataPrepError(str(e)) from None


def train_tokenizer(documents: Iterable[str], model_path: str, vocab_size: int = 1024, max_docs: int | None = None,
                    caseops_transform: bool = False) -> str:
    """Train a SentencePiece BPE tokenizer with the challenge's sp1024 conventions, saved to model_path
    (plus the matching .vocab next to it); returns model_path.

    Conventions (those of the official fineweb_1024_bpe.model): ids pad 0, bos 1, eos 2, unk 3, then
    256 byte-fallback pieces (so every string is encodable), digits split, no dummy prefix, NFKC
    normalisation, character coverage 0.999. The vocabulary has exactly vocab_size pieces: a corpus
    too small for that raises (a few hundred bytes of real text already give 512 pieces).

    caseops_transform: the record's CaseOps tokenizer (FRONTIER.md section 1): trained on
    caseops.encode(text), the four operators as user-defined symbols (ids 4-7, bytes 8-263) and
    hard_vocab_limit off, as the record's model says: a small corpus then gives fewer than
    vocab_size pieces instead of an error (the model's VOCAB_SIZE must be the count it got).
    """
    import sentencepiece as spm

    specials = 4 + (len(caseops.OPERATORS) if caseops_transform else 0)
    if vocab_size < specials + 256 + 1 or vocab_size > 2**16:
        raise DataPrepError(
            f"vocab_size {vocab_size} is outside [{specials + 257}, 65536]; {specials} special and 256 byte pieces come first, "
            "and ids must fit uint16 shards"
        )
    texts = []
    for text in documents:
        text = text.replace("\x00", " ").strip()  # as the official trainer feeds it
        if text:
            texts.append(caseops.encode(text) if caseops_transform else text)
        if max_docs is not None and len(texts) >= max_docs:
            break
    if not texts:
        raise DataPrepError("no non-empty documents to train the tokenizer on; give it some text (the command line trains on the documents after the first --val-docs)")
    # SentencePiece silently skips sentences longer than max_sentence_length (4192 bytes by default);
    # a small corpus cannot spare its long documents, so raise the limit to the longest one.
    longest = max(len(t.encode("utf-8")) for t in texts)
    folder = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".train_tokenizer.", dir=folder)  # same filesystem: renames are atomic
    try:
        prefix = os.path.join(staging, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(texts),
                model_prefix=prefix,
                model_type="bpe",
                vocab_size=vocab_size,
                character_coverage=0.999,
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="nmt_nfkc",
                add_dummy_prefix=False,
                pad_id=0,
                bos_id=1,
                eos_id=2,
                unk_id=3,
                # sp1024: exactly vocab_size pieces (the model's embedding table has that many rows);
                # CaseOps: as the record's tokenizer was trained
                hard_vocab_limit=not caseops_transform,
                user_defined_symbols=list(caseops.OPERATORS) if caseops_transform else [],
                max_sentence_length=max(SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES, longest),
                num_threads=os.cpu_count() or 1,
                minloglevel=2,  # errors only: its per-step training log is noise here
            )
        except RuntimeError as e:
            message = str(e)
            if "Vocabulary size too high" in message:
                limit = message.rsplit("<=", 1)[-1].strip(" .")
                raise DataPrepError(
                    f"the corpus ({len(texts)} documents) is too small for a {vocab_size}-piece tokenizer "
                    f"(SentencePiece can build at most {limit}); give it more text or a smaller vocab_size"
                ) from None
            if "Vocabulary size is smaller than required_chars" in message:
                needed = re.search(r"vs (\d+)", message)
                raise DataPrepError(
                    f"vocab_size {vocab_size} is too small for this corpus: its distinct characters plus the {specials + 256} special "
                    f"and byte pieces need {needed.group(1) if needed else 'more'}; raise vocab_size"
                ) from None
            raise
        vocab_path = os.path.splitext(model_path)[0] + ".vocab"
        os.replace(prefix + ".vocab", vocab_path)
        os.replace(prefix + ".model", model_path)  # last: a present .model means a finished tokenizer
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path


# -- encoding one document ----------------------------------------------------------------------------


def piece_offsets(sp, text: str) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, begins, ends) of text's pieces: [begin, end) is the span of `text` (in characters)
    that SentencePiece reports each piece covers, its "surface". Byte-fallback pieces of one
    character: the last holds the character, the others are empty; whitespace the normaliser
    collapsed lies in the surface of the piece that holds what is left of it; leading and trailing
    whitespace it dropped lies in no surface."""
    try:
        result = sp.encode(text, out_type="offset_mapping")  # sentencepiece >= 0.2.1
        spans = np.asarray(result["offsets"], dtype=np.int64).reshape(-1, 2)
        return list(result["ids"]), spans[:, 0], spans[:, 1]
    except (ValueError, RuntimeError, TypeError):
        pass
    proto = sp.encode(text, out_type="immutable_proto")  # older releases: spans in UTF-8 bytes
    ids = [p.id for p in proto.pieces]
    byte_spans = np.asarray([(p.begin, p.end) for p in proto.pieces], dtype=np.int64).reshape(-1, 2)
    utf8 = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    chars_before = np.concatenate([[0], np.cumsum((utf8 & 0xC0) != 0x80)])  # byte offset -> character offset
    return ids, chars_before[byte_spans[:, 0]], chars_before[byte_spans[:, 1]]


def piece_bytes(weights: np.ndarray, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """int64 [pieces]: the summed character weights of each piece's surface, every character
    counted once (by the first piece whose surface holds it, should surfaces ever overlap)."""
    cumulative = np.concatenate([[0], np.cumsum(weights, dtype=np.int64)])
    covered = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]) if len(ends) else ends
    starts = np.maximum(begins, covered)
    stops = np.maximum(ends, starts)
    return cumulative[stops] - cumulative[starts]


def encode_document(sp, text: str, caseops_transform: bool, with_bytes: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens, sidecar) of one document: tokens uint16 = [BOS] + the SentencePiece ids of the text
    (after caseops.encode when caseops_transform); sidecar uint16 (with_bytes) = per token the UTF-8
    bytes of the ORIGINAL text it covers (FRONTIER.md section 1: BOS 0, operators 0, an ESC'd literal
    operator 3, ASCII letters 1, other characters their UTF-8 length), else None."""
    encoded = caseops.encode(text) if caseops_transform else text
    if not with_bytes:
        ids = sp.encode(encoded, out_type=int)
        return np.asarray([sp.bos_id(), *ids], dtype=np.uint16), None
    ids, begins, ends = piece_offsets(sp, encoded)
    counts = piece_bytes(caseops.byte_weights(encoded), begins, ends)
    if counts.size and counts.max() > MAX_PIECE_BYTES:
        raise DataPrepError(
            f"a piece of document {text[:40]!r}... covers {int(counts.max()):,} bytes, more than a uint16 sidecar entry holds; "
            "shorten its runs of whitespace"
        )
    return np.asarray([sp.bos_id(), *ids], dtype=np.uint16), np.concatenate([[0], counts]).astype(np.uint16)


# -- the worker pool ----------------------------------------------------------------------------------

_worker_state: dict = {}


def _start_worker(tokenizer_path: str, caseops_transform: bool, threads: int) -> None:
    _worker_state.update(sp=open_sentencepiece(tokenizer_path), caseops=caseops_transform, threads=threads)


def _encode_batch(sp, texts: list[str], threads: int) -> list[list[int]]:
    try:
        return sp.encode(texts, out_type=int, num_threads=threads)
    except TypeError:  # older sentencepiece without num_threads
        return sp.encode(texts, out_type=int)


def _encode_chunk(task: tuple[list[str], bool]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    texts, with_bytes = task
    sp, caseops_transform = _worker_state["sp"], _worker_state["caseops"]
    if with_bytes:
        return [encode_document(sp, text, caseops_transform, with_bytes) for text in texts]
    encoded = [caseops.encode(text) for text in texts] if caseops_transform else texts
    bos = sp.bos_id()
    return [(np.asarray([bos, *ids], dtype=np.uint16), None) for ids in _encode_batch(sp, encoded, _worker_state["threads"])]


def _chunks(documents: Iterable[str], val_docs: int, with_val_bytes: bool) -> Iterator[tuple[list[str], bool]]:
    """(texts, with_bytes) tasks of up to CHUNK_DOCS documents; a chunk never mixes the splits."""
    chunk: list[str] = []
    for index, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise DataPrepError(f"documents must be strings, got a {type(doc).__name__}; pass the text of each document")
        if chunk and (len(chunk) == CHUNK_DOCS or index == val_docs):
            yield chunk, with_val_bytes and index - len(chunk) < val_docs
            chunk = []
        chunk.append(doc)
    if chunk:
        yield chunk, with_val_bytes and index + 1 - len(chunk) < val_docs


def _encoded_documents(chunks: Iterator, tokenizer_path: str, caseops_transform: bool, workers: int) -> Iterator:
    """encode_document's results in document order: in this process (workers == 1) or in a pool
    with at most 2 * workers chunks in flight (memory stays bounded for any corpus)."""
    if workers == 1:  # SentencePiece's batch encoding may still use every core
        _start_worker(tokenizer_path, caseops_transform, os.cpu_count() or 1)
        for task in chunks:
            yield from _encode_chunk(task)
        return
    with multiprocessing.get_context().Pool(workers, _start_worker, (tokenizer_path, caseops_transform, 1)) as pool:
        in_flight: collections.deque = collections.deque()
        for task in chunks:
            in_flight.append(pool.apply_async(_encode_chunk, (task,)))
            if len(in_flight) >= 2 * workers:
                yield from in_flight.popleft().get()
        while in_flight:
            yield from in_flight.popleft().get()


# -- shards ---------------------------------------------------------------------------------------


class _ShardWriter:
    """Accumulates one split's token stream and writes it as consecutive shards of shard_tokens."""

    def __init__(self, folder: str, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.pending: list[np.ndarray] = []  # uint16 pieces not yet written, fewer than shard_tokens in all
        self.pending_tokens = 0
        self.files: list[str] = []
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.tokens += tokens.size
        while tokens.size:
            take = min(self.shard_tokens - self.pending_tokens, tokens.size)
            self.pending.append(tokens[:take])
            self.pending_tokens += take
            tokens = tokens[take:]
            if self.pending_tokens == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.pending_tokens:
            return
        name = SHARD_PATTERN.format(split=self.split, index=len(self.files))
        write_shard(os.path.join(self.folder, name), np.concatenate(self.pending))
        self.files.append(name)
        self.pending, self.pending_tokens = [], 0


class _Progress:
    """A line every PROGRESS_EVERY_S seconds and one at the end: documents, their rate, tokens."""

    def __init__(self, log: Callable[[str], None] | None):
        self.log, self.start = log, time.perf_counter()
        self.last = self.start

    def rate(self, docs: int) -> float:
        return docs / max(time.perf_counter() - self.start, 1e-9)

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.log is not None and (final or now - self.last >= PROGRESS_EVERY_S):
            self.last = now
            self.log(f"{'encoded' if final else 'encoding:'} {docs:,} documents, {tokens:,} tokens, "
                     f"{self.rate(docs):,.0f} documents/s over {now - self.start:.1f}s")


def prepare(
    documents: Iterable[str],
    out_dir: str,
    tokenizer_path: str,
    val_docs: int = 50_000,
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
    caseops_transform: bool = False,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize documents into out_dir/fineweb_{val,train}_*.bin; returns counts of documents,
    tokens and files per split (and the shard file names), and the documents per second.

    The first val_docs documents form the validation split. caseops_transform: documents go
    through caseops.encode first and each val shard gets its byte sidecar fineweb_val_bytes_*.bin
    (same length, same cuts). workers: encoding processes (1: this one). log: receives progress
    lines. Shards are staged in a hidden folder inside out_dir and moved into place only once every
    document is written, so a failure leaves out_dir as it was. Existing shards in out_dir are an
    error unless overwrite (then they are replaced, stale higher-numbered ones included).
    tokenizer.json is written last: a run killed before it leaves no manifest (no check), never
    one naming another tokenizer. An OSError is one WriteFailed line naming the file.
    """
    if val_docs < 0:
        raise DataPrepError(f"val_docs is {val_docs}; it must be >= 0 (the number of leading documents kept for validation)")
    if shard_tokens < 1:
        raise DataPrepError(f"shard_tokens is {shard_tokens}; it must be a positive number of tokens per shard")
    if workers < 1:
        raise DataPrepError(f"workers is {workers}; it must be a positive number of encoding processes")
    sp = load_tokenizer(tokenizer_path)
    bos_id, vocab_size = sp.bos_id(), sp.vocab_size()
    if bos_id < 0:
        raise DataPrepError(f"tokenizer {tokenizer_path} has no BOS piece; every document must start with BOS, so train it with bos_id=1")
    if vocab_size > 2**16:
        raise DataPrepError(f"tokenizer {tokenizer_path} has {vocab_size} pieces; uint16 shards hold at most 65536")
    if caseops_transform:
        missing = [f"U+{ord(op):04X}" for op in caseops.OPERATORS if sp.piece_to_id(op) == sp.unk_id()]
        if missing:
            raise DataPrepError(
                f"tokenizer {tokenizer_path} has no piece for the CaseOps operator(s) {', '.join(missing)}; use a CaseOps tokenizer "
                "(the record's, or --train-tokenizer with --caseops)"
            )
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise WriteFailed(describe_os_error(out_dir, e)) from e
    existing = _existing_shards(out_dir)
    if existing and not overwrite:
        raise DataPrepError(
            f"{out_dir} already holds {len(existing)} shard(s) ({os.path.basename(existing[0])}, ...); "
            "choose an empty folder or pass --overwrite to replace them"
        )
    progress = _Progress(log)
    try:
        docs, writers = _write_shards(documents, out_dir, tokenizer_path, val_docs, shard_tokens, caseops_transform, workers, progress)
        write_tokenizer_manifest(out_dir, tokenizer_path, vocab_size)
    except OSError as e:
        if isinstance(e, WriteFailed):
            raise
        raise WriteFailed(describe_os_error(e.filename or out_dir, e)) from e
    total_docs = docs["val"] + docs["train"]
    progress.update(total_docs, writers["val"].tokens + writers["train"].tokens, final=True)
    return {
        "out_dir": out_dir,
        "bos_id": bos_id,
        "vocab_size": vocab_size,
        "caseops": caseops_transform,
        "docs_per_second": progress.rate(total_docs),
        **{f"docs_{split}": docs[split] for split in ("val", "train")},
        **{f"tokens_{split}": writers[split].tokens for split in writers},
        **{f"files_{split}": list(writers[split].files) for split in writers},
    }


def _write_shards(documents, out_dir: str, tokenizer_path: str, val_docs: int, shard_tokens: int,
                  caseops_transform: bool, workers: int, progress: _Progress):
    """Encode into a staging folder, then swap the shards in; returns (docs, writers) per split
    (writers["val_bytes"] holds the sidecars, present with caseops_transform)."""
    staging = tempfile.mkdtemp(prefix=".prepare.", dir=out_dir)
    try:
        splits = ("val", "train", "val_bytes") if caseops_transform else ("val", "train")
        writers = {split: _ShardWriter(staging, split, shard_tokens) for split in splits}
        docs = {"val": 0, "train": 0}
        chunks = _chunks(documents, val_docs, with_val_bytes=caseops_transform)
        for tokens, sidecar in _encoded_documents(chunks, tokenizer_path, caseops_transform, workers):
            split = "val" if docs["val"] < val_docs else "train"
            writers[split].add(tokens)
            if sidecar is not None:
                writers["val_bytes"].add(sidecar)
            docs[split] += 1
            progress.update(docs["val"] + docs["train"], writers["val"].tokens + writers["train"].tokens)
        if docs["val"] + docs["train"] == 0:
            raise DataPrepError("the input holds no documents; give at least one non-empty document")
        for writer in writers.values():
            writer.flush()
        # Stale shards of an earlier, larger run would otherwise mix in; the old manifest goes too,
        # so until the new one is written the shards are unchecked, never checked against the
        # tokenizer of the shards they replaced.
        for path in _existing_shards(out_dir) + glob.glob(os.path.join(out_dir, TOKENIZER_MANIFEST)):
            os.remove(path)
        for writer in writers.values():
            for name in writer.files:
                os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return docs, writers


def _existing_shards(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(folder, "fineweb_train_*.bin")) + glob.glob(os.path.join(folder, "fineweb_val_*.bin")))


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Turn text documents into token shards of the Parameter Golf format.")
    p.add_argument("--input", required=True, nargs="+", help=".jsonl ({\"text\": ...} per line) or text file(s), read in order")
    p.add_argument("--out", required=True, help="folder for fineweb_{train,val}_*.bin")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model to encode with (written first with --train-tokenizer)")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "txt"), help="input format; auto = by extension")
    p.add_argument("--one-doc-per-line", action="store_true", help="text input: each non-empty line is a document (default: blank-line-separated blocks)")
    p.add_argument("--val-docs", type=int, default=50_000, help="leading documents that form the validation split (the challenge: 50,000)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (the official shards: 100,000,000)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--train-tokenizer", action="store_true", help="first train a new SentencePiece BPE tokenizer on the training documents")
    p.add_argument("--vocab-size", type=int, default=None, help="pieces of the trained tokenizer (default 1024; 8192 with --caseops)")
    p.add_argument("--tokenizer-train-docs", type=int, default=None, help="train the tokenizer on at most this many training documents")
    p.add_argument("--caseops", action="store_true",
                   help="apply the CaseOps case transform before tokenising and write fineweb_val_bytes_*.bin byte sidecars (FRONTIER.md section 1)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: every core)")
    return p


def _documents(args) -> Iterator[str]:
    for path in args.input:
        yield from read_documents(path, args.format, args.one_doc_per_line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    vocab_size = args.vocab_size or (8192 if args.caseops else 1024)
    try:
        for path in args.input:  # fail before any work (reading is lazy)
            read_documents(path, args.format, args.one_doc_per_line)
        if args.train_tokenizer:
            # Train on the training split only: a tokenizer fitted to the validation text would
            # flatter the validation score.
            train_docs = (doc for i, doc in enumerate(_documents(args)) if i >= args.val_docs)
            train_tokenizer(train_docs, args.tokenizer, vocab_size, max_docs=args.tokenizer_train_docs, caseops_transform=args.caseops)
            print(f"tokenizer: {args.tokenizer} ({load_tokenizer(args.tokenizer).vocab_size()} pieces)")
        stats = prepare(_documents(args), args.out, args.tokenizer, args.val_docs, args.shard_tokens, overwrite=args.overwrite,
                        caseops_transform=args.caseops, workers=args.workers, log=lambda line: print(line, file=sys.stderr))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:  # disk full, permissions: not the input's fault
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split in ("val", "train"):
        print(f"{split}: {stats[f'docs_{split}']:,} documents, {stats[f'tokens_{split}']:,} tokens, {len(stats[f'files_{split}'])} shard(s)")
    if args.caseops:
        print(f"val byte sidecars: {len(stats['files_val_bytes'])} (fineweb_val_bytes_*.bin; evaluation counts bytes from them)")
    if not stats["files_train"]:
        print(f"note: every document went to validation (--val-docs {args.val_docs}); there are no training shards")
    print(f"shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
