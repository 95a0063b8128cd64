"""Download the challenge's official sp1024 FineWeb shards and tokenizer from Hugging Face.

    python data/download.py --train-shards 10     # whole validation split + first 10 train shards + tokenizer

Remote layout (dataset repo willdepueoai/parameter-golf, as read by the challenge's own helper
data/cached_challenge_fineweb.py; not fetched from this workspace, which has no internet):
    datasets/manifest.json
    datasets/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin   (100M tokens per train shard)
    datasets/tokenizers/fineweb_1024_bpe.{model,vocab}
The manifest's "datasets" entry named fineweb10B_sp1024 gives the shard counts (stats.files_train,
stats.files_val) and its tokenizer; its "tokenizers" entry gives the tokenizer files. Files land
under --out (default: this folder) without the leading "datasets/": data/manifest.json,
data/datasets/fineweb10B_sp1024/, data/tokenizers/, which is where model/config.py looks.

Each file is fetched with urllib (stdlib only; the same code path everywhere, so the tests cover
what runs) from <endpoint>/datasets/<repo>/resolve/<revision>/<path>, into <name>.part, resumed
with an HTTP Range request after an interruption, checked (a shard's header against its size, a
tokenizer by loading it, sha256 where the manifest gives one) and only then renamed into place.
Files already in place that pass the checks are skipped, so re-running is cheap and safe.
Finally tokenizer.json goes beside the shards (the tokenizer's name, sha256 and piece count), which
model.data.check_tokenizer_matches reads so that a run with another tokenizer stops at start-up.
"""
import argparse
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

if __package__ in (None, ""):  # run as `python data/download.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.atomic import WriteFailed, describe_os_error  # noqa: E402
from model.data import open_sentencepiece, sha256_of, shard_token_count, write_tokenizer_manifest  # noqa: E402

DEFAULT_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # HF_ENDPOINT: a mirror, as huggingface_hub honours it
DEFAULT_REPO = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
DEFAULT_REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DEFAULT_DATASET = "fineweb10B_sp1024"
DEFAULT_TRAIN_SHARDS = 80  # 8B training tokens, what the challenge's helper fetches by default
DEFAULT_TOKENIZER_FILES = ("tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab")
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60


class DownloadError(RuntimeError):
    """A download that cannot go on; the message is one sentence a user can act on."""


class NetworkError(DownloadError):
    """The server cannot be reached at all."""


# -- one file ---------------------------------------------------------------------------------------


def check_file(path: str, expected_sha256: str | None = None) -> None:
    """Raise ValueError when the file at path is not what it claims to be (by its kind, and sha256)."""
    if path.endswith(".bin") or path.endswith(".bin.part"):
        shard_token_count(path)  # header (magic, version, token count) against the file size; no token read
    elif path.endswith((".model", ".model.part")):
        _check_sentencepiece_model(path)
    elif path.endswith((".json", ".json.part")):
        with open(path, encoding="utf-8") as f:
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise ValueError(f"{path}: sha256 {actual} differs from the manifest's {expected_sha256}")


def _sentencepiece_vocab_size(path: str) -> int | None:
    """The piece count of a tokenizer file (ValueError when it is not one); None without sentencepiece."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return None  # nothing to check with; the trainer will complain loudly enough
    return int(open_sentencepiece(path).vocab_size())


def _check_sentencepiece_model(path: str) -> None:
    _sentencepiece_vocab_size(path)


def download_file(
    url: str,
    dest: str,
    expected_sha256: str | None = None,
    retries: int = 3,
    opener: Callable = urllib.request.urlopen,
    log: Callable[[str], None] = print,
) -> str:
    """Fetch url into dest, resumably; returns "skipped", "downloaded" or "resumed".

    The bytes go to dest + ".part"; after a dropped connection the next attempt (up to `retries`
    more in this call, or a later run) asks only for the missing tail with a Range request. A
    finished .part that fails check_file is deleted and the error raised; a file already at dest
    that fails the checks is fetched again.
    """
    name = os.path.basename(dest)
    if os.path.exists(dest):
        try:
            check_file(dest, expected_sha256)
            return "skipped"
        except ValueError as e:
            log(f"{name}: the existing file fails its check ({e}); downloading it again")
            os.remove(dest)
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DownloadError(describe_os_error(folder, e)) from None
    part = dest + ".part"
    resumed = os.path.exists(part) and os.path.getsize(part) > 0
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, opener)
            break
        except _Interrupted as e:
            if attempt == retries:
                raise DownloadError(f"{name}: the connection dropped {retries + 1} times ({e}); run the command again to resume from {os.path.getsize(part):,} bytes") from None
            resumed = True
            log(f"{name}: connection dropped ({e}); resuming from {os.path.getsize(part):,} bytes")
    try:
        check_file(part, expected_sha256)
    except ValueError as e:
        os.remove(part)
        raise DownloadError(f"{name} arrived corrupted ({e}); the partial file was deleted, run the command again to re-download it") from None
    try:
        os.replace(part, dest)
    except OSError as e:
        raise DownloadError(describe_os_error(dest, e)) from None
    return "resumed" if resumed else "downloaded"


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file holds what arrived."""


def _fetch_into(url: str, part: str, opener: Callable) -> None:
    """Append the bytes of url missing from part (all of them when part is absent)."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "golf-triton-download/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    host = urllib.parse.urlsplit(url).netloc
    try:
        response = opener(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return  # nothing left to fetch: the .part is already whole (check_file decides)
        if e.code == 404:
            raise DownloadError(f"{url} does not exist (HTTP 404); check --repo, --remote-root and --dataset") from None
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}; try again later or check the address") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NetworkError(f"cannot reach {host}: {reason}; download on a machine with internet and copy data/ over") from None
    with response:
        total = _expected_total(response, offset)
        mode = "ab"
        if offset and response.status != 206:
            mode, offset = "wb", 0  # the server ignored the Range header and sends the whole file
        received = offset
        try:
            with open(part, mode) as f:
                while chunk := _read_chunk(response):
                    f.write(chunk)
                    f.flush()  # a write error surfaces here, for this file, not at close
                    received += len(chunk)
        except OSError as e:  # a full disk is not a dropped connection: no retry, one line naming the file
            raise DownloadError(describe_os_error(part, e)) from None
    if total is not None and received < total:
        raise _Interrupted(f"{received:,} of {total:,} bytes")


def _read_chunk(response) -> bytes:
    try:
        return response.read(CHUNK_BYTES)
    except (OSError, http.client.HTTPException) as e:  # resets, timeouts, IncompleteRead
        raise _Interrupted(f"{type(e).__name__}: {e}") from None


def _expected_total(response, offset: int) -> int | None:
    """Size of the whole file per the response headers, when they say."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if not match:
            return None
        if int(match.group(1)) != offset:
            raise DownloadError(f"the server answered a Range request for byte {offset} with {content_range!r}; delete the .part file and run again")
        return None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


# -- the dataset ------------------------------------------------------------------------------------


def resolve_url(endpoint: str, repo: str, revision: str, path: str) -> str:
    return f"{endpoint.rstrip('/')}/datasets/{repo}/resolve/{revision}/{urllib.parse.quote(path)}"


def local_path(out_dir: str, remote_root: str, remote_path: str) -> str:
    """Where a remote file lands: its path below the remote root, under out_dir."""
    relative = remote_path[len(remote_root) + 1 :] if remote_root and remote_path.startswith(remote_root + "/") else remote_path
    return os.path.join(out_dir, *relative.split("/"))


def expected_sha256(manifest: dict, relative_path: str) -> str | None:
    """The sha256 the manifest gives for a file (path relative to the remote root), if any.

    The published manifest's per-file hashes (if it has them) were not seen from here; this
    accepts a "files" table either as {path: {"sha256": ...}} or as [{"path": ..., "sha256": ...}].
    """
    files = manifest.get("files")
    if isinstance(files, dict):
        entry = files.get(relative_path)
        return entry.get("sha256") if isinstance(entry, dict) else None
    if isinstance(files, list):
        for entry in files:
            if isinstance(entry, dict) and entry.get("path") == relative_path:
                return entry.get("sha256")
    return None


def plan_files(manifest: dict, dataset: str, train_shards: int) -> list[str]:
    """Paths (relative to the remote root) to fetch: every val shard, the first train_shards train
    shards, the tokenizer files."""
    entry = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset), None)
    if entry is None:
        names = ", ".join(str(d.get("name")) for d in manifest.get("datasets", [])) or "none"
        raise DownloadError(f"the manifest lists no dataset {dataset!r} (it has: {names}); pick one of those with --dataset")
    stats = entry.get("stats") or {}
    try:
        files_train, files_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"the manifest entry of {dataset} has no stats.files_train/files_val shard counts; the remote layout changed, update data/download.py") from None
    if not 0 <= train_shards <= files_train:
        raise DownloadError(f"--train-shards {train_shards} is outside [0, {files_train}]: {dataset} has {files_train} training shards")
    paths = [f"datasets/{dataset}/fineweb_val_{i:06d}.bin" for i in range(files_val)]
    paths += [f"datasets/{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        paths += list(DEFAULT_TOKENIZER_FILES)
    else:
        paths += [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    return paths


def download_dataset(
    out_dir: str,
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    dataset: str = DEFAULT_DATASET,
    repo: str = DEFAULT_REPO,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    revision: str = "main",
    endpoint: str = DEFAULT_ENDPOINT,
    opener: Callable = urllib.request.urlopen,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Fetch the manifest, then the files it implies; returns {local path: "skipped" | "downloaded" | "resumed"}."""

    def remote(path: str) -> str:
        return f"{remote_root}/{path}" if remote_root else path

    manifest_local = local_path(out_dir, remote_root, remote("manifest.json"))
    results = {manifest_local: download_file(resolve_url(endpoint, repo, revision, remote("manifest.json")), manifest_local, opener=opener, log=log)}
    with open(manifest_local, encoding="utf-8") as f:
        manifest = json.load(f)
    paths = plan_files(manifest, dataset, train_shards)
    for i, path in enumerate(paths, start=1):
        dest = local_path(out_dir, remote_root, remote(path))
        url = resolve_url(endpoint, repo, revision, remote(path))
        outcome = download_file(url, dest, expected_sha256(manifest, path), opener=opener, log=log)
        results[dest] = outcome
        log(f"[{i}/{len(paths)}] {path}: {outcome} ({os.path.getsize(dest) / 1e6:,.1f} MB)")
    shards = local_path(out_dir, remote_root, remote(f"datasets/{dataset}"))
    tokenizer = next((p for p in paths if p.endswith(".model")), None)
    if tokenizer is not None and os.path.isdir(shards):
        tokenizer = local_path(out_dir, remote_root, remote(tokenizer))
        log(f"tokenizer manifest: {write_tokenizer_manifest(shards, tokenizer, _sentencepiece_vocab_size(tokenizer))}")
    return results


def build_parser() -> argparse.ArgumentParser:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Download the official Parameter Golf sp1024 shards and tokenizer (resumable).")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="training shards of 100M tokens to fetch (default 80 = 8B tokens); validation is always whole")
    p.add_argument("--out", default=here, help="folder that receives manifest.json, datasets/ and tokenizers/ (default: data/)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="dataset name in the manifest")
    p.add_argument("--repo", default=DEFAULT_REPO, help="Hugging Face dataset repo")
    p.add_argument("--remote-root", default=DEFAULT_REMOTE_ROOT, help="folder of the export inside the repo")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the repo")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="Hugging Face server (or a mirror)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        download_dataset(args.out, args.train_shards, args.dataset, args.repo, args.remote_root, args.revision, args.endpoint)
    except (DownloadError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: data under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
