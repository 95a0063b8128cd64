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

Python API (the smoke preset uses it): `prepare(documents, out_dir, tokenizer_path, val_docs,
shard_tokens) -> dict` and `train_tokenizer(documents, model_path, vocab_size)`.
"""
import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.atomic import WriteFailed, describe_os_error  # noqa: E402
from model.data import TOKENIZER_MANIFEST, open_sentencepiece, write_shard, write_tokenizer_manifest  # noqa: E402

SHARD_PATTERN = "fineweb_{split}_{index:06d}.bin"
ENCODE_BATCH_DOCS = 1024  # documents per SentencePiece batch call (it encodes a batch on several threads)
SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES = 4192


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


def train_tokenizer(documents: Iterable[str], model_path: str, vocab_size: int = 1024, max_docs: int | None = None) -> str:
    """Train a SentencePiece BPE tokenizer with the challenge's sp1024 conventions, saved to model_path
    (plus the matching .vocab next to it); returns model_path.

    Conventions (those of the official fineweb_1024_bpe.model): ids pad 0, bos 1, eos 2, unk 3, then
    256 byte-fallback pieces (so every string is encodable), digits split, no dummy prefix, NFKC
    normalisation, character coverage 0.999. The vocabulary has exactly vocab_size pieces: a corpus
    too small for that raises (a few hundred bytes of real text already give 512 pieces).
    """
    import sentencepiece as spm

    if vocab_size < 260 + 1 or vocab_size > 2**16:
        raise DataPrepError(f"vocab_size {vocab_size} is outside [261, 65536]; 4 special and 256 byte pieces come first, and ids must fit uint16 shards")
    texts = []
    for text in documents:
        text = text.replace("\x00", " ").strip()  # as the official trainer feeds it
        if text:
            texts.append(text)
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
                hard_vocab_limit=True,  # exactly vocab_size pieces: the model's embedding table has that many rows
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
                    f"vocab_size {vocab_size} is too small for this corpus: its distinct characters plus the 260 special "
                    f"and byte pieces need {needed.group(1) if needed else 'more'}; raise vocab_size"
                ) from None
            raise
        vocab_path = os.path.splitext(model_path)[0] + ".vocab"
        os.replace(prefix + ".vocab", vocab_path)
        os.replace(prefix + ".model", model_path)  # last: a present .model means a finished tokenizer
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model_path


# -- shards ---------------------------------------------------------------------------------------


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for doc in documents:
        if not isinstance(doc, str):
            raise DataPrepError(f"documents must be strings, got a {type(doc).__name__}; pass the text of each document")
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode_batch(sp, texts: list[str]) -> list[list[int]]:
    try:
        return sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)
    except TypeError:  # older sentencepiece without num_threads
        return sp.encode(texts, out_type=int)


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


def prepare(
    documents: Iterable[str],
    out_dir: str,
    tokenizer_path: str,
    val_docs: int = 50_000,
    shard_tokens: int = 100_000_000,
    overwrite: bool = False,
) -> dict:
    """Tokenize documents into out_dir/fineweb_{val,train}_*.bin; returns counts of documents,
    tokens and files per split (and the shard file names).

    The first val_docs documents form the validation split. Shards are staged in a hidden folder
    inside out_dir and moved into place only once every document is written, so a failure leaves
    out_dir as it was. Existing shards in out_dir are an error unless overwrite (then they are
    replaced, stale higher-numbered ones included). tokenizer.json is written last: a run killed
    before it leaves no manifest (no check), never one naming another tokenizer. An OSError is
    one WriteFailed line naming the file.
    """
    if val_docs < 0:
        raise DataPrepError(f"val_docs is {val_docs}; it must be >= 0 (the number of leading documents kept for validation)")
    if shard_tokens < 1:
        raise DataPrepError(f"shard_tokens is {shard_tokens}; it must be a positive number of tokens per shard")
    sp = load_tokenizer(tokenizer_path)
    bos_id, vocab_size = sp.bos_id(), sp.vocab_size()
    if bos_id < 0:
        raise DataPrepError(f"tokenizer {tokenizer_path} has no BOS piece; every document must start with BOS, so train it with bos_id=1")
    if vocab_size > 2**16:
        raise DataPrepError(f"tokenizer {tokenizer_path} has {vocab_size} pieces; uint16 shards hold at most 65536")
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
    try:
        docs, writers = _write_shards(documents, out_dir, sp, bos_id, val_docs, shard_tokens)
        write_tokenizer_manifest(out_dir, tokenizer_path, vocab_size)
    except OSError as e:
        if isinstance(e, WriteFailed):
            raise
        raise WriteFailed(describe_os_error(e.filename or out_dir, e)) from e
    return {
        "out_dir": out_dir,
        "bos_id": bos_id,
        "vocab_size": vocab_size,
        **{f"docs_{split}": docs[split] for split in writers},
        **{f"tokens_{split}": writers[split].tokens for split in writers},
        **{f"files_{split}": list(writers[split].files) for split in writers},
    }


def _write_shards(documents, out_dir: str, sp, bos_id: int, val_docs: int, shard_tokens: int):
    """Encode into a staging folder, then swap the shards in; returns (docs, writers) per split."""
    staging = tempfile.mkdtemp(prefix=".prepare.", dir=out_dir)
    try:
        writers = {split: _ShardWriter(staging, split, shard_tokens) for split in ("val", "train")}
        docs = {"val": 0, "train": 0}
        for batch in _batches(documents, ENCODE_BATCH_DOCS):
            for ids in _encode_batch(sp, batch):
                split = "val" if docs["val"] < val_docs else "train"
                doc_tokens = np.empty(len(ids) + 1, dtype=np.uint16)
                doc_tokens[0] = bos_id
                doc_tokens[1:] = ids
                writers[split].add(doc_tokens)
                docs[split] += 1
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
    p.add_argument("--vocab-size", type=int, default=1024, help="pieces of the trained tokenizer")
    p.add_argument("--tokenizer-train-docs", type=int, default=None, help="train the tokenizer on at most this many training documents")
    return p


def _documents(args) -> Iterator[str]:
    for path in args.input:
        yield from read_documents(path, args.format, args.one_doc_per_line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for path in args.input:  # fail before any work (reading is lazy)
            read_documents(path, args.format, args.one_doc_per_line)
        if args.train_tokenizer:
            # Train on the training split only: a tokenizer fitted to the validation text would
            # flatter the validation score.
            train_docs = (doc for i, doc in enumerate(_documents(args)) if i >= args.val_docs)
            train_tokenizer(train_docs, args.tokenizer, args.vocab_size, max_docs=args.tokenizer_train_docs)
            print(f"tokenizer: {args.tokenizer} ({args.vocab_size} pieces)")
        stats = prepare(_documents(args), args.out, args.tokenizer, args.val_docs, args.shard_tokens, overwrite=args.overwrite)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:  # disk full, permissions: not the input's fault
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split in ("val", "train"):
        print(f"{split}: {stats[f'docs_{split}']:,} documents, {stats[f'tokens_{split}']:,} tokens, {len(stats[f'files_{split}'])} shard(s)")
    if not stats["files_train"]:
        print(f"note: every document went to validation (--val-docs {args.val_docs}); there are no training shards")
    print(f"shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
