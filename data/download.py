"""Download the challenge's published FineWeb shards and tokenizer from Hugging Face.

    python data/download.py --train-shards 10                  # sp1024: whole validation split + 10 train shards + tokenizer
    python data/download.py --variant sp8192 --train-shards 10
    python data/download.py --train-shards 0 --with-docs       # the raw documents, to build CaseOps shards

It uses huggingface_hub (the library of the challenge's own data/cached_challenge_fineweb.py), an
optional extra: `pip install golf-triton[download]`. The trainer does not need it.

Remote layout (as the challenge's script and data/README.md read it; not fetched from this
workspace, which has no internet): in the dataset repo, under the remote root (default "datasets"):
    manifest.json
    datasets/<dataset>/fineweb_{val,train}_NNNNNN.bin   (100M tokens per train shard)
    tokenizers/<the manifest's tokenizer files>
    docs_selected.jsonl, docs_selected.source_manifest.json   (--with-docs: the selected raw documents)
The manifest's "datasets" entry gives the shard counts (stats.files_train, stats.files_val) and
its tokenizer's name; its "tokenizers" entry gives the tokenizer files. Files land under --out
(default: this folder) without the remote root: data/manifest.json, data/datasets/<dataset>/,
data/tokenizers/, which is where model/config.py looks.

Variants (--variant; --repo and --dataset override, MATCHED_FINEWEB_REPO_ID as in the challenge's script):
    sp1024 (default), sp512, sp2048, sp4096: the challenge's own export, willdepueoai/parameter-golf
        (the names its script lists; the manifest says which it holds today).
    sp8192: plain SentencePiece 8192, kevclark/parameter-golf, the community export the sp8192
        records download (their scripts name dataset fineweb10B_sp8192 and tokenizer sp_bpe_8192
        in its manifest); seen in public scripts, not checked from here.
No published CaseOps export is known here: build it with --with-docs and
`data/prepare.py --caseops` (README, "Data").

Each file is fetched by hf_hub_download into a staging folder (--out/.download), which the library
resumes after an interruption (here too: up to --retries more attempts in one run, or a later run);
then checked (a shard's header against its size, a tokenizer by loading it, JSON by parsing it,
sha256 where a manifest gives one) and only then moved into place. Files already in place that
pass the checks are skipped, so re-running is cheap and safe. Finally tokenizer.json goes beside
the shards (the tokenizer's name, sha256 and piece count), which model.data.check_tokenizer_matches
reads so that a run with another tokenizer stops at start-up.
"""
import argparse
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from typing import NamedTuple

if __package__ in (None, ""):  # run as `python data/download.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.atomic import WriteFailed, describe_os_error  # noqa: E402
from model.data import open_sentencepiece, sha256_of, shard_token_count, write_tokenizer_manifest  # noqa: E402

OFFICIAL_REPO = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DEFAULT_TRAIN_SHARDS = 80  # 8B training tokens, what the challenge's helper fetches by default
STAGING = ".download"  # inside --out: the library's partial files and metadata, kept until done
DOCS_FILES = ("docs_selected.source_manifest.json", "docs_selected.jsonl")
INSTALL_HINT = "pip install golf-triton[download] (or pip install huggingface_hub)"


class Variant(NamedTuple):
    repo: str
    dataset: str
    tokenizer_files: tuple  # paths below the remote root, used when the manifest names none


def _sp_variant(vocab: int, repo: str = OFFICIAL_REPO) -> Variant:
    stem = f"tokenizers/fineweb_{vocab}_bpe"
    return Variant(repo, f"fineweb10B_sp{vocab}", (f"{stem}.model", f"{stem}.vocab"))


VARIANTS = {
    "sp1024": _sp_variant(1024),
    "sp512": _sp_variant(512),
    "sp2048": _sp_variant(2048),
    "sp4096": _sp_variant(4096),
    "sp8192": _sp_variant(8192, repo="kevclark/parameter-golf"),
}
DEFAULT_VARIANT = "sp1024"


class DownloadError(RuntimeError):
    """A download that cannot go on; the message is one sentence a user can act on."""


class NetworkError(DownloadError):
    """The server cannot be reached at all."""


# -- checks -------------------------------------------------------------------------------------------


def check_file(path: str, expected_sha256: str | None = None) -> None:
    """Raise ValueError when the file at path is not what it claims to be (by its kind, and sha256)."""
    if path.endswith(".bin"):
        shard_token_count(path)  # header (magic, version, token count) against the file size; no token read
    elif path.endswith(".model"):
        _sentencepiece_vocab_size(path)
    elif path.endswith(".json"):
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


# -- one file -----------------------------------------------------------------------------------------


def hub_download_function() -> Callable:
    """huggingface_hub.hf_hub_download, or one DownloadError line saying how to install it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError(f"data/download.py needs huggingface_hub, which is not installed; {INSTALL_HINT}") from None
    return hf_hub_download


def _hub_errors() -> dict:
    try:
        from huggingface_hub import errors
    except ImportError:
        return {}
    return {name: getattr(errors, name) for name in (
        "LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError", "RevisionNotFoundError",
        "EntryNotFoundError", "HfHubHTTPError") if hasattr(errors, name)}


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR}


def _explain(error: Exception, repo: str, remote_path: str, endpoint: str | None) -> DownloadError | None:
    """The DownloadError a hub failure means, or None when it is transient (worth a retry)."""
    kinds = _hub_errors()
    host = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").split("://")[-1].rstrip("/")

    def isa(name: str) -> bool:
        return name in kinds and isinstance(error, kinds[name])

    if isa("LocalEntryNotFoundError") or isa("OfflineModeIsEnabled"):
        cause = error.__cause__ or error.__context__
        reason = str(cause).strip() if cause is not None else "no connection"
        return NetworkError(f"cannot reach {host}: {reason}; download on a machine with internet and copy data/ over")
    if isa("RepositoryNotFoundError"):
        return DownloadError(f"the dataset repo {repo} does not exist on {host} (or is private); check --repo or --variant")
    if isa("RevisionNotFoundError"):
        return DownloadError(f"{repo} has no such revision; check --revision")
    if isa("EntryNotFoundError"):
        return DownloadError(f"{remote_path} does not exist in {repo}; check --remote-root and --dataset (or --variant)")
    if isa("HfHubHTTPError"):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status is not None and status < 500 and status != 429:
            return DownloadError(f"{host} answered HTTP {status} for {remote_path} in {repo}; check the repo and your access")
        return None  # 5xx, 429: the server may answer next time
    if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
        return DownloadError(describe_os_error(error.filename or remote_path, error))
    return None


def fetch_file(
    repo: str,
    remote_path: str,
    dest: str,
    revision: str = "main",
    endpoint: str | None = None,
    expected_sha256: str | None = None,
    staging: str | None = None,
    retries: int = 3,
    hub_download: Callable | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Fetch remote_path (in the dataset repo) to dest; returns "skipped" or "downloaded".

    hf_hub_download writes into `staging` (default: dest's folder/.download), where its partial
    file lets the next attempt (up to `retries` more in this call, or a later run) go on from
    where it stopped. The file must pass check_file before it is moved to dest; one that fails
    is deleted and the error raised. A file already at dest that fails the checks is fetched again.
    """
    name = os.path.basename(dest)
    if os.path.exists(dest):
        try:
            check_file(dest, expected_sha256)
            return "skipped"
        except ValueError as e:
            log(f"{name}: the existing file fails its check ({e}); downloading it again")
            os.remove(dest)
    download = hub_download or hub_download_function()
    staging = staging or os.path.join(os.path.dirname(os.path.abspath(dest)), STAGING)
    folder, filename = os.path.split(remote_path)
    for attempt in range(retries + 1):
        try:
            fetched = download(repo_id=repo, filename=filename, subfolder=folder or None, repo_type="dataset",
                               revision=revision, local_dir=staging, endpoint=endpoint)
            break
        except Exception as e:  # noqa: BLE001 - every failure is sorted into final or transient below
            final = _explain(e, repo, remote_path, endpoint)
            if final is not None:
                raise final from None
            if attempt == retries:
                raise DownloadError(
                    f"{name}: the transfer failed {retries + 1} times ({type(e).__name__}: {str(e).strip() or 'no detail'}); "
                    "run the command again to resume"
                ) from None
            log(f"{name}: transfer failed ({type(e).__name__}); trying again, from where it stopped")
    try:
        check_file(fetched, expected_sha256)
    except ValueError as e:
        os.remove(fetched)
        raise DownloadError(f"{name} arrived corrupted ({e}); it was deleted, run the command again to re-download it") from None
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.replace(fetched, dest)
    except OSError as e:
        raise DownloadError(describe_os_error(e.filename or dest, e)) from None
    return "downloaded"


# -- the dataset ----------------------------------------------------------------------------------------


def local_path(out_dir: str, relative_path: str) -> str:
    """Where a file lands: its path below the remote root, under out_dir."""
    return os.path.join(out_dir, *relative_path.split("/"))


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


def plan_files(manifest: dict, dataset: str, train_shards: int, fallback_tokenizer_files=()) -> list[str]:
    """Paths (relative to the remote root) to fetch: every val shard, the first train_shards train
    shards, the tokenizer files (the manifest's, else fallback_tokenizer_files)."""
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
        paths += list(fallback_tokenizer_files)
    else:
        paths += [str(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    return paths


def _docs_sha256(out_dir: str) -> str | None:
    """docs_sha256 of the downloaded docs_selected.source_manifest.json (the challenge's README
    says it holds one), when it does."""
    try:
        with open(local_path(out_dir, DOCS_FILES[0]), encoding="utf-8") as f:
            value = json.load(f).get("docs_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def download_dataset(
    out_dir: str,
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    variant: str = DEFAULT_VARIANT,
    dataset: str | None = None,
    repo: str | None = None,
    remote_root: str = DEFAULT_REMOTE_ROOT,
    revision: str = "main",
    endpoint: str | None = None,
    with_docs: bool = False,
    retries: int = 3,
    hub_download: Callable | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """Fetch the manifest, then the files it implies; returns {local path: "skipped" | "downloaded"}."""
    if variant not in VARIANTS:
        raise DownloadError(f"unknown variant {variant!r}; pick one of {', '.join(VARIANTS)}")
    chosen = VARIANTS[variant]
    repo = repo or os.environ.get("MATCHED_FINEWEB_REPO_ID") or chosen.repo
    dataset = dataset or chosen.dataset
    download = hub_download or hub_download_function()
    staging = os.path.join(out_dir, STAGING)

    def fetch(path: str, sha256: str | None = None) -> str:
        remote = f"{remote_root}/{path}" if remote_root else path
        dest = local_path(out_dir, path)
        results[dest] = fetch_file(repo, remote, dest, revision, endpoint, sha256, staging, retries, download, log)
        return dest

    results: dict[str, str] = {}
    with open(fetch("manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    paths = plan_files(manifest, dataset, train_shards, chosen.tokenizer_files)
    for i, path in enumerate(paths, start=1):
        dest = fetch(path, expected_sha256(manifest, path))
        log(f"[{i}/{len(paths)}] {path}: {results[dest]} ({os.path.getsize(dest) / 1e6:,.1f} MB)")
    if with_docs:
        fetch(DOCS_FILES[0])
        dest = fetch(DOCS_FILES[1], _docs_sha256(out_dir))
        log(f"{DOCS_FILES[1]}: {results[dest]} ({os.path.getsize(dest) / 1e6:,.1f} MB)")
    shards = local_path(out_dir, f"datasets/{dataset}")
    tokenizer = next((p for p in paths if p.endswith(".model")), None)
    if tokenizer is not None and os.path.isdir(shards):
        tokenizer = local_path(out_dir, tokenizer)
        log(f"tokenizer manifest: {write_tokenizer_manifest(shards, tokenizer, _sentencepiece_vocab_size(tokenizer))}")
    shutil.rmtree(staging, ignore_errors=True)  # every file is in place: no partial file to resume
    return results


def build_parser() -> argparse.ArgumentParser:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Download the published Parameter Golf shards and tokenizer from Hugging Face (resumable, checked).")
    p.add_argument("--variant", default=DEFAULT_VARIANT, choices=sorted(VARIANTS), help="tokenizer family (default sp1024; sp8192 is a community export)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="training shards of 100M tokens to fetch (default 80 = 8B tokens); validation is always whole")
    p.add_argument("--out", default=here, help="folder that receives manifest.json, datasets/ and tokenizers/ (default: data/)")
    p.add_argument("--with-docs", action="store_true", help="also fetch docs_selected.jsonl, the raw documents (input of data/prepare.py --caseops)")
    p.add_argument("--dataset", default=None, help="dataset name in the manifest (default: the variant's)")
    p.add_argument("--repo", default=None, help="Hugging Face dataset repo (default: the variant's, or MATCHED_FINEWEB_REPO_ID)")
    p.add_argument("--remote-root", default=DEFAULT_REMOTE_ROOT, help="folder of the export inside the repo")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the repo")
    p.add_argument("--endpoint", default=None, help="Hugging Face server or mirror (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--retries", type=int, default=3, help="more attempts per file after a failed transfer (each resumes)")
    return p


def _quiet_hub_logging() -> None:
    """huggingface_hub logs a warning per retry of an unreachable server; the error line says it all."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        return
    hub_logging.set_verbosity_error()


def main(argv=None, hub_download: Callable | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        download = hub_download or hub_download_function()
        _quiet_hub_logging()
        download_dataset(args.out, args.train_shards, args.variant, args.dataset, args.repo, args.remote_root, args.revision,
                         args.endpoint, args.with_docs, args.retries, download)
    except (DownloadError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: data under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
