"""The artifact: quantise the state dict, serialise it, compress it, check the budget.

Two quantisers and three containers, chosen by QUANT and COMPRESSOR:
- QUANT=int6 (SPEC "Export", the seed's; described below) or QUANT=gptq (FRONTIER.md section 4:
  `quantize_state_dict_gptq`, with model/gptq.py's GPTQ and model/lqer.py's low-rank correction);
- COMPRESSOR=zstd (a zstd frame, the seed's), brotli (model/compressors.py) or pergroup
  (model/pergroup.py's PGRP container). `read_artifact` tells them apart by their first bytes.
Write path: collect_hessians (model/gptq.py) -> write_artifact(..., quant=, compressor=, hessians=,
gate_names=, cfg=, code_bytes=) -> read_artifact(path) -> state dict.

SPEC "Export" (QUANT=int6). Each tensor is stored in one of five classes, chosen by what the model
declares and by size:

| class | which tensors (the first row that matches)                            | stored as                          |
|-------|-----------------------------------------------------------------------|------------------------------------|
| raw   | non-float tensors                                                     | as is                              |
| fp32  | declared control tensors (any size); 0/1-D ones of <= 65,536 elements | fp32 (exact for fp32/bf16/fp16)    |
| int6  | > 65,536 elements and declared int6 (the attention and MLP matrices)  | int8 in [-32, 31] + fp16 row scale |
| int8  | other tensors of > 65,536 elements (embedding tables)                 | int8 in [-127, 127] + fp16 row scale, each row clipped at the 99.99984th percentile of its abs |
| fp16  | other tensors (small matrices)                                        | fp16 (fp32 where fp16 overflows)   |

The declarations come from the model (`fp32_names=model.control_tensor_names()`,
`int6_names=model.int6_matrix_names()`) and are required: a state dict alone does not say which
small matrix is a gain or which large one an attention weight, and a guess from names would store
a new control tensor in fp16 without a word. Every declared name must be in the state dict.

"Per row" means over the last dimension (a 0-D or 1-D tensor is one row). Dequantisation restores
every tensor's name, shape and dtype; the values are q * scale for int6/int8 and exact casts otherwise.

Byte layout before compression (our own, so nothing is unpickled when an artifact is read):
    MAGIC | header length (8 bytes, little-endian) | header (UTF-8 JSON) | blobs
The header lists every tensor (name, class, original dtype and shape) and, for each stored field
("q", "scale" or "data"), its dtype, shape, offset and length in the blob area. Blobs are grouped by
class and field (all int6 values, then all int8 values, then the scales, ...) because zstd finds
more repetition in a run of similar bytes than in a mix.
"""
import io
import json
import math
import os
import time

import torch
import zstandard

import kernels
from model import compressors, gptq, lqer, pergroup
from model.atomic import atomic_open
from model.config import Config  # its class attributes are the field defaults: zstd level, byte budget

# --------------------------------------------------------------------------- classification

SMALL_TENSOR_MAX_ELEMENTS = 65_536  # at most this many elements: kept in floating point

INT8_MAX = 127
INT8_CLIP_QUANTILE = 0.9999984  # the 99.99984th percentile of |w| per row
# The seed record's exporter floors the int8 scale at 1/127 (as int6 floors at 1/31): a zero row
# then gets a finite scale and all-zero values, and no row spends int8 levels below 1/127.
INT8_SCALE_FLOOR = 1.0 / INT8_MAX
FP16_MAX = 65504.0
# torch.quantile refuses inputs of more than 2**24 elements; larger inputs go through kthvalue.
QUANTILE_MAX_ELEMENTS = 2**24

CLASSES = ("int6", "int8", "fp16", "fp32", "raw", "gptq")  # gptq: the frontier's (model/gptq.py)

FORMAT = "golf-artifact-v1"
FORMAT_FRONTIER = "golf-artifact-frontier-v1"  # classes gptq (with LQER fields), int8 (the gate), fp16, raw
FORMATS = (FORMAT, FORMAT_FRONTIER)
MAGIC = b"GOLFART1"
WRITE_CHUNK_BYTES = 1 << 20


def tensor_class(name: str, t: torch.Tensor, *, fp32_names, int6_names) -> str:
    """The class a state-dict entry is stored in (see the module docstring)."""
    if not t.is_floating_point():
        return "raw"
    if name in fp32_names:
        return "fp32"
    if t.numel() > SMALL_TENSOR_MAX_ELEMENTS:
        return "int6" if name in int6_names else "int8"
    return "fp32" if t.dim() <= 1 else "fp16"


def _check_declared(sd: dict, fp32_names, int6_names) -> None:
    """One line for declarations that do not fit the state dict (another model's, or a typo)."""
    for label, names in (("fp32_names", fp32_names), ("int6_names", int6_names)):
        missing = sorted(set(names) - set(sd))
        if missing:
            raise ValueError(
                f"export: {label} declares {missing[:3]}{' ...' if len(missing) > 3 else ''} that the state dict "
                f"does not hold; pass the declarations of the model whose state_dict() is exported "
                f"(model.control_tensor_names(), model.int6_matrix_names())"
            )
    both = sorted(set(fp32_names) & set(int6_names))
    if both:
        raise ValueError(f"export: {both[:3]} declared both fp32 and int6; a tensor has one class")


# --------------------------------------------------------------------------- per-row quantisers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as fp32 [rows, last dim]; a 0/1-D tensor is one row."""
    return t.detach().float().reshape(-1, t.shape[-1] if t.dim() >= 1 else 1).contiguous()


def row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of a [rows, n] (linear interpolation, as torch.quantile) -> [rows].

    torch.quantile caps its input at 2**24 elements, so rows go through it in chunks that fit;
    a single row longer than that goes through the kthvalue route.
    """
    rows, n = a.shape
    if n > QUANTILE_MAX_ELEMENTS:
        return quantile_by_kthvalue(a, q)
    chunk = max(1, QUANTILE_MAX_ELEMENTS // n)
    return torch.cat([torch.quantile(a[i : i + chunk], q, dim=1) for i in range(0, rows, chunk)])


def quantile_by_kthvalue(a: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile of a [rows, n] with torch.quantile's linear interpolation, via kthvalue."""
    position = q * (a.shape[1] - 1)
    lo, hi = math.floor(position), math.ceil(position)
    below = a.kthvalue(lo + 1, dim=1).values
    above = a.kthvalue(hi + 1, dim=1).values if hi != lo else below
    return below + (above - below) * (position - lo)


def quantize_int6(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int6 through the public kernel API (the Triton kernel when that backend is active).

    Returns q int8 [rows, n] in [-32, 31] and fp16 scales [rows].
    """
    return kernels.int6_quantize(_rows(t))


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 with outlier clipping: q int8 [rows, n] in [-127, 127], fp16 scales [rows].

    Each row is clipped at the 99.99984th percentile of its |w|, so one outlier cannot stretch the
    scale of the whole row; the fp16-rounded scale is the one used to round, so that
    |clamp(w) - q * scale| <= scale / 2 holds for the stored scale.
    """
    w = _rows(t)  # [rows, n]
    clip = row_quantile(w.abs(), INT8_CLIP_QUANTILE)  # [rows]
    scale = (clip / INT8_MAX).clamp_min(INT8_SCALE_FLOOR).to(torch.float16)
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / scale.float()[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


# --------------------------------------------------------------------------- state dict <-> payload


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the artifact header")
    return dtype


def _empty_report() -> dict:
    return {cls: dict(tensors=0, elements=0, bytes_before=0, bytes_after=0) for cls in (*CLASSES, "total")}


def quantize_state_dict(sd: dict, *, fp32_names, int6_names) -> tuple[dict, dict]:
    """Quantise a state dict -> (payload, report); fp32_names and int6_names are the model's
    declarations (see the module docstring).

    payload: {"format": FORMAT, "tensors": {name: {"class", "dtype", "shape", and the stored
    tensors "q" + "scale" (int6/int8) or "data"}}}, every tensor on the CPU.
    report: per class (and "total"): tensors, elements, bytes_before (original dtype) and
    bytes_after (stored, before compression); `format_report` turns it into log lines.
    """
    _check_declared(sd, fp32_names, int6_names)
    fp32_names, int6_names = set(fp32_names), set(int6_names)
    entries, report = {}, _empty_report()
    with torch.no_grad():
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"export: state-dict entry {name!r} is a {type(t).__name__}, not a tensor; pass model.state_dict()"
                )
            t = t.detach()
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"export: {name} holds NaN or inf values, so the weights have diverged; "
                    "export an earlier checkpoint or fix training"
                )
            cls = tensor_class(name, t, fp32_names=fp32_names, int6_names=int6_names)
            entry = dict(dtype=_dtype_name(t.dtype), shape=list(t.shape))
            if cls == "int6":
                q, scale = quantize_int6(t)
                entry.update(q=q.cpu(), scale=scale.cpu())
            elif cls == "int8":
                q, scale = quantize_int8(t)
                entry.update(q=q.cpu(), scale=scale.cpu())
            elif cls == "fp16" and bool((t.abs() > FP16_MAX).any()):
                cls = "fp32"  # a value fp16 cannot hold: keep precision rather than store inf
                entry.update(data=t.float().cpu().contiguous())
            elif cls in ("fp16", "fp32"):
                entry.update(data=t.to(torch.float16 if cls == "fp16" else torch.float32).cpu().contiguous())
            else:
                entry.update(data=t.cpu().contiguous())
            entry["class"] = cls
            entries[name] = entry
            _account(report, cls, t, entry)
    return {"format": FORMAT, "tensors": entries}, report


def _account(report: dict, cls: str, t: torch.Tensor, entry: dict) -> None:
    """Add tensor t, stored as `entry`, to its class's row and the total row of the export report."""
    stored = sum(v.numel() * v.element_size() for v in entry.values() if isinstance(v, torch.Tensor))
    for key in (cls, "total"):
        row = report[key]
        row["tensors"] += 1
        row["elements"] += t.numel()
        row["bytes_before"] += t.numel() * t.element_size()
        row["bytes_after"] += stored


def dequantize_state_dict(payload: dict) -> dict:
    """The state dict a payload stands for: same names, shapes and dtypes as the exported one (CPU)."""
    sd = {}
    for name, entry in payload["tensors"].items():
        dtype, shape, cls = _dtype_from_name(entry["dtype"]), tuple(entry["shape"]), entry["class"]
        if cls in ("int6", "int8", "gptq"):
            values = entry["q"].float() * entry["scale"].float()[:, None]
            if "lqer_a" in entry:
                values = values + lqer.correction(entry)
        elif cls in ("fp16", "fp32", "raw"):
            values = entry["data"]
        else:
            raise ValueError(f"export: tensor {name!r} has unknown class {cls!r}; the artifact was written by another version")
        sd[name] = values.to(dtype).reshape(shape).clone()
    return sd


# --------------------------------------------------------------------------- QUANT=gptq (FRONTIER.md section 4)

GATE_MIN_ELEMENTS, GATE_MAX_ELEMENTS = 32, 8192  # the attention gate's int8 routing applies within these sizes
GPTQ_BITS = 6


def gptq_names(sd: dict, *, fp32_names=()) -> list[str]:
    """The tensors QUANT=gptq quantises (floating point, > 65,536 elements, not declared fp32):
    the names model.gptq.collect_hessians needs Hessians for."""
    fp32_names = set(fp32_names)
    return [name for name, t in sd.items()
            if t.is_floating_point() and t.numel() > SMALL_TENSOR_MAX_ELEMENTS and name not in fp32_names]


def gptq_setting(name: str, int6_names, cfg: Config) -> tuple[int, float]:
    """(bits, clip sigma) of a GPTQ tensor by its role: the tied embedding EMBED_BITS and
    EMBED_CLIP_SIGMAS; the declared int6 matrices 6 bits and MLP_/ATTN_CLIP_SIGMAS."""
    if name == gptq.EMBED_NAME:
        return cfg.embed_bits, cfg.embed_clip_sigmas
    if name in int6_names and ".mlp." in name:
        return GPTQ_BITS, cfg.mlp_clip_sigmas
    if name in int6_names and ".attn." in name:
        return GPTQ_BITS, cfg.attn_clip_sigmas
    raise ValueError(f"export: QUANT=gptq has no role for {name} (neither tok_emb.weight nor a declared attention or "
                     f"MLP matrix); declare it or export with QUANT=int6")


def quantize_int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's int8 per row: s = fp16(max|row| / 127), q = clamp(round(w / s), -127, 127) (0 where s is 0)."""
    w = _rows(t)
    scale = (w.abs().amax(dim=1) / INT8_MAX).to(torch.float16)
    s = scale.float()[:, None]
    q = torch.where(s > 0, torch.clamp(torch.round(w / torch.where(s > 0, s, torch.ones_like(s))), -INT8_MAX, INT8_MAX),
                    torch.zeros_like(w))
    return q.to(torch.int8), scale


def quantize_state_dict_gptq(sd: dict, *, fp32_names, int6_names, hessians: dict, gate_names=(),
                             cfg: Config | None = None, device=None) -> tuple[dict, dict]:
    """FRONTIER's routing -> (payload, report), the report as quantize_state_dict's plus "lqer"
    (the corrected names, largest error first) and "seconds" (gptq, lqer).

    - floating-point tensors of > 65,536 elements (not declared fp32): GPTQ (class gptq), batched
      over the tensors that share a shape and setting, on `device` (default: the GPU when there is one);
    - the declared gate weights (2-D, 32..8192 elements, GATED_ATTN_QUANT_GATE): int8 per row;
    - every other floating-point tensor of <= 65,536 elements: fp16 as FRONTIER says, declared control
      tensors included (fp32 where fp16 would overflow), restored to its dtype at load;
    - LQER (LQER_ENABLED) on the LQER_TOP_K GPTQ tensors with the largest ||W - q s||_F.
    """
    cfg = cfg or Config()
    _check_declared(sd, fp32_names, int6_names)
    missing_gates = sorted(set(gate_names) - set(sd))
    if missing_gates:
        raise ValueError(f"export: gate_names declares {missing_gates[:3]} that the state dict does not hold")
    fp32_names, int6_names, gate_names = set(fp32_names), set(int6_names), set(gate_names)
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"export: state-dict entry {name!r} is a {type(t).__name__}, not a tensor; pass model.state_dict()")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"export: {name} holds NaN or inf values, so the weights have diverged; "
                             "export an earlier checkpoint or fix training")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    targets = gptq_names(sd, fp32_names=fp32_names)
    for name in targets:
        if name not in (hessians or {}):
            raise ValueError(f"export: QUANT=gptq needs a Hessian for {name}; collect them with "
                             f"model.gptq.collect_hessians(model, batches, export.gptq_names(state_dict))")
        cols = sd[name].shape[-1]
        if tuple(hessians[name].shape) != (cols, cols):
            raise ValueError(f"export: the Hessian of {name} is {tuple(hessians[name].shape)}, not [{cols}, {cols}]")

    t0 = time.perf_counter()
    quantised = {}  # name -> (q, scale)
    batches = {}
    for name in targets:
        bits, sigma = gptq_setting(name, int6_names, cfg)
        batches.setdefault((tuple(sd[name].shape), bits, sigma), []).append(name)
    with torch.no_grad():
        for (_, bits, sigma), names in batches.items():
            W = torch.stack([sd[n].detach().to(device, torch.float32) for n in names])
            H = torch.stack([hessians[n].detach().to(device, torch.float32) for n in names])
            q, scale = gptq.gptq_quantize(W, H, bits, sigma)
            for i, n in enumerate(names):
                quantised[n] = (q[i].cpu(), scale[i].cpu())
    gptq_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrections = {}
    if cfg.lqer_enabled and quantised:
        def error(n):
            q, scale = quantised[n]
            return sd[n].detach().float().cpu() - q.float() * scale.float()[:, None]

        norms = {n: float(torch.linalg.matrix_norm(error(n))) for n in quantised}
        for n in lqer.largest_errors(norms, cfg.lqer_top_k):
            corrections[n] = lqer.factorize(error(n), cfg.lqer_rank, asym=cfg.lqer_asym_enabled,
                                            group=cfg.lqer_asym_group, factor_bits=cfg.lqer_factor_bits)
    lqer_seconds = time.perf_counter() - t0

    entries, report = {}, _empty_report()
    for name, t in sd.items():
        t = t.detach()
        entry = dict(dtype=_dtype_name(t.dtype), shape=list(t.shape))
        if name in quantised:
            cls = "gptq"
            q, scale = quantised[name]
            entry.update(q=q, scale=scale, **corrections.get(name, {}))
        elif not t.is_floating_point():
            cls = "raw"
            entry.update(data=t.cpu().contiguous())
        elif (name in gate_names and cfg.gated_attn_quant_gate and t.dim() == 2
              and GATE_MIN_ELEMENTS <= t.numel() <= GATE_MAX_ELEMENTS):
            cls = "int8"
            q, scale = quantize_int8_rows(t)
            entry.update(q=q.cpu(), scale=scale.cpu())
        elif (name in fp32_names and t.numel() > SMALL_TENSOR_MAX_ELEMENTS) or bool((t.abs() > FP16_MAX).any()):
            cls = "fp32"  # a large declared control tensor (never GPTQ), or values fp16 cannot hold
            entry.update(data=t.float().cpu().contiguous())
        else:
            cls = "fp16"
            entry.update(data=t.to(torch.float16).cpu().contiguous())
        entry["class"] = cls
        entries[name] = entry
        _account(report, cls, t, entry)
    report["lqer"] = list(corrections)
    report["seconds"] = dict(gptq=gptq_seconds, lqer=lqer_seconds)
    return {"format": FORMAT_FRONTIER, "tensors": entries}, report


def format_report(report: dict, compressed_bytes: int | None = None, compressor: str = "zstd") -> list[str]:
    """Log lines: one per non-empty class, then the total (and the compressed size when given)."""
    lines = []
    for cls in (*CLASSES, "total"):
        row = report[cls]
        if row["tensors"] or cls == "total":
            lines.append(
                f"export {cls:>5}: {row['tensors']:4d} tensors {row['elements']:>12,} elements "
                f"{row['bytes_before']:>13,} -> {row['bytes_after']:>13,} bytes"
            )
    if "seconds" in report:  # QUANT=gptq
        corrected = ", ".join(report["lqer"]) or "none"
        lines.append(f"export gptq: {report['seconds']['gptq']:.1f}s; lqer on {corrected} in {report['seconds']['lqer']:.1f}s")
    if compressed_bytes is not None:
        lines.append(f"export {compressor}: {report['total']['bytes_after']:,} -> {compressed_bytes:,} bytes")
    return lines


# --------------------------------------------------------------------------- payload <-> bytes

_FIELD_ORDER = ("q", "scale", "data", *lqer.FIELDS)


def serialize(payload: dict) -> bytes:
    """Payload -> uncompressed bytes (MAGIC, header length, JSON header, blobs grouped by class and field)."""
    fields = []  # (class index, field index, name, field, tensor)
    for name, entry in payload["tensors"].items():
        for field in _FIELD_ORDER:
            if field in entry:
                fields.append((CLASSES.index(entry["class"]), _FIELD_ORDER.index(field), name, field, entry[field]))
    fields.sort(key=lambda f: f[:2])  # stable: state-dict order within a group

    header = {"format": payload["format"], "tensors": []}
    if "meta" in payload:  # the per-group container's layout (model/pergroup.py)
        header["meta"] = payload["meta"]
    by_name = {}
    for name, entry in payload["tensors"].items():
        record = dict(name=name, cls=entry["class"], dtype=entry["dtype"], shape=entry["shape"], fields={})
        header["tensors"].append(record)
        by_name[name] = record
    blobs, offset = [], 0
    for _, _, name, field, t in fields:
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        by_name[name]["fields"][field] = dict(dtype=_dtype_name(t.dtype), shape=list(t.shape), offset=offset, nbytes=len(data))
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, len(header_bytes).to_bytes(8, "little"), header_bytes, *blobs])


def deserialize(raw: bytes) -> dict:
    """Uncompressed bytes -> payload; ValueError (one sentence) when they are not an artifact."""
    if raw[: len(MAGIC)] != MAGIC:
        raise ValueError("it does not start with the artifact marker")
    start = len(MAGIC) + 8
    header_len = int.from_bytes(raw[len(MAGIC) : start], "little")
    try:
        header = json.loads(raw[start : start + header_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"its header is not valid JSON ({error})") from None
    if header.get("format") not in FORMATS:
        raise ValueError(f"its format is {header.get('format')!r}, this code reads {' or '.join(map(repr, FORMATS))}")
    blob_area = memoryview(raw)[start + header_len :]
    entries = {}
    for record in header["tensors"]:
        entry = {"class": record["cls"], "dtype": record["dtype"], "shape": record["shape"]}
        for field, spec in record["fields"].items():
            end = spec["offset"] + spec["nbytes"]
            if end > len(blob_area):
                raise ValueError(f"tensor {record['name']!r} runs past the end of the data (truncated)")
            dtype = _dtype_from_name(spec["dtype"])
            data = bytearray(blob_area[spec["offset"] : end])  # own, aligned, writable memory
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            entry[field] = flat.view(dtype).reshape(spec["shape"])
        entries[record["name"]] = entry
    payload = {"format": header["format"], "tensors": entries}
    if "meta" in header:
        payload["meta"] = header["meta"]
    return payload


# --------------------------------------------------------------------------- compression and files


def _check_level(level: int) -> None:
    if not isinstance(level, int) or not 1 <= level <= 22:
        raise ValueError(
            f"export: zstd level {level!r} is not an integer in 1..22; use {Config.zstd_level} for the artifact"
        )


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # The content size and a checksum in the frame let the reader reject truncated or damaged files.
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def _compress_into(raw: bytes, out, level: int) -> None:
    """Stream the zstd frame of raw into the binary file object out (left open)."""
    with _compressor(level).stream_writer(out, size=len(raw), closefd=False) as writer:
        view = memoryview(raw)
        for start in range(0, len(raw), WRITE_CHUNK_BYTES):
            writer.write(view[start : start + WRITE_CHUNK_BYTES])


def _quantize(sd: dict, *, fp32_names, int6_names, quant: str, hessians, gate_names, cfg) -> tuple[dict, dict]:
    if quant == "int6":
        return quantize_state_dict(sd, fp32_names=fp32_names, int6_names=int6_names)
    if quant == "gptq":
        return quantize_state_dict_gptq(sd, fp32_names=fp32_names, int6_names=int6_names, hessians=hessians,
                                        gate_names=gate_names, cfg=cfg)
    raise ValueError(f"export: QUANT={quant!r} is not one of int6, gptq")


def _encode_into(payload: dict, out, *, compressor: str, level: int, group_coder: str) -> None:
    """Write the compressed payload into the binary file object out: a zstd frame (streamed), a
    brotli stream (model/compressors.py) or the per-group container (model/pergroup.py)."""
    if compressor == "zstd":
        _compress_into(serialize(payload), out, level)
        return
    if compressor == "brotli":
        blob = compressors.encode(serialize(payload), "brotli")
    elif compressor == "pergroup":
        blob = pergroup.pack(payload, group_coder, zstd_level=level)
    else:
        raise ValueError(f"export: COMPRESSOR={compressor!r} is not one of zstd, brotli, pergroup")
    view = memoryview(blob)
    for start in range(0, len(blob), WRITE_CHUNK_BYTES):
        out.write(view[start : start + WRITE_CHUNK_BYTES])


def artifact_to_bytes(sd: dict, *, fp32_names, int6_names, level: int = Config.zstd_level, quant: str = "int6",
                      compressor: str = "zstd", hessians: dict | None = None, gate_names=(), cfg: Config | None = None,
                      group_coder: str = "brotli") -> tuple[bytes, dict]:
    """The compressed artifact of a state dict, in memory -> (bytes, report). Kept beside
    write_artifact for sizing an artifact without a file: the round-trip tests use it."""
    _check_level(level)
    payload, report = _quantize(sd, fp32_names=fp32_names, int6_names=int6_names, quant=quant, hessians=hessians,
                                gate_names=gate_names, cfg=cfg)
    out = io.BytesIO()
    _encode_into(payload, out, compressor=compressor, level=level, group_coder=group_coder)
    return out.getvalue(), report


def write_artifact(
    sd: dict, path: str, *, fp32_names, int6_names, level: int = Config.zstd_level, report: dict | None = None,
    quant: str = "int6", compressor: str = "zstd", hessians: dict | None = None, gate_names=(),
    cfg: Config | None = None, group_coder: str = "brotli", code_bytes: int | None = None,
    budget: int = Config.artifact_budget_bytes,
) -> int:
    """Quantise, serialise and compress sd into path atomically -> the file's size in bytes.

    quant: "int6" (SPEC's per-row rounding, the seed's) or "gptq" (FRONTIER's: pass `hessians`
    from model.gptq.collect_hessians, `gate_names` the int8-per-row gate weights the model
    declares, and `cfg` for the clip sigmas, EMBED_BITS and the LQER settings).
    compressor: "zstd" (at `level`), "brotli" or "pergroup" (its groups coded by `group_coder`:
    brotli, zstd, or lrzip when that program is on PATH).
    code_bytes: the counted code's size; when given, an artifact whose size plus code_bytes exceeds
    `budget` is not written (ValueError, one line: by how much, and what to try).

    The bytes go through model.atomic.atomic_open, so a failure at any point (including Ctrl-C
    and the budget check) leaves path as it was and no temp file behind; an OSError (a full disk)
    comes out as one WriteFailed line naming path. Pass a dict as `report` to receive the
    per-class report of the quantiser.
    """
    _check_level(level)
    if compressor == "pergroup" and group_coder == "lrzip" and not compressors.lrzip_available():
        raise ValueError("export: the lrzip group coder was asked for but lrzip is not on PATH; install it "
                         "(apt-get install lrzip) or set PERGROUP_CODER=brotli")
    payload, class_report = _quantize(sd, fp32_names=fp32_names, int6_names=int6_names, quant=quant,
                                      hessians=hessians, gate_names=gate_names, cfg=cfg)
    if report is not None:
        report.update(class_report)
    with atomic_open(path, "wb") as f:
        _encode_into(payload, f, compressor=compressor, level=level, group_coder=group_coder)
        size = f.tell()
        if code_bytes is not None:  # raised inside: the temp file goes, path stays as it was
            check_budget(size, code_bytes, budget, compressor=compressor)
    return size


def write_model_artifact(model, path: str, cfg: Config, *, hessians: dict | None = None, code_bytes: int | None = None,
                         report: dict | None = None, group_coder: str | None = None) -> int:
    """write_artifact for a model under its config: the declarations from the model (control
    tensors, int6 matrices, and the int8-row gate when it declares one), QUANT, COMPRESSOR,
    PERGROUP_CODER (unless group_coder says otherwise) and ZSTD_LEVEL from cfg. Under QUANT=gptq pass `hessians` from model.gptq.collect_hessians(model,
    batches, gptq_names(model.state_dict(), fp32_names=model.control_tensor_names()))."""
    gates = model.int8_row_matrix_names() if hasattr(model, "int8_row_matrix_names") else ()
    return write_artifact(model.state_dict(), path, fp32_names=model.control_tensor_names(),
                          int6_names=model.int6_matrix_names(), level=cfg.zstd_level, report=report, quant=cfg.quant,
                          compressor=cfg.compressor, hessians=hessians, gate_names=gates, cfg=cfg,
                          group_coder=group_coder or cfg.pergroup_coder, code_bytes=code_bytes, budget=cfg.artifact_budget_bytes)


def artifact_from_bytes(blob: bytes) -> dict:
    """Compressed artifact bytes (any container: zstd frame, brotli, PGRP) -> state dict;
    ValueError naming the problem when they are not one."""
    try:
        if blob.startswith(pergroup.MAGIC):
            payload = pergroup.unpack(blob)
        elif blob.startswith(compressors.BROTLI_MAGIC):
            payload = deserialize(compressors.decode(blob))
        else:  # the seed's zstd frame; anything else fails here with zstd's reason
            try:
                raw = zstandard.ZstdDecompressor().decompress(blob)
            except zstandard.ZstdError as error:
                raise ValueError(f"it is not a complete zstd frame with its size recorded ({error})") from None
            payload = deserialize(raw)
        return dequantize_state_dict(payload)
    except (KeyError, TypeError, IndexError, RuntimeError) as error:  # a header that does not fit its data
        raise ValueError(f"its contents are inconsistent ({type(error).__name__}: {error})") from None


def read_artifact(path: str) -> dict:
    """Read, decompress and dequantise an artifact file -> state dict (CPU, original dtypes)."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return artifact_from_bytes(blob)
    except ValueError as error:
        raise ValueError(f"{path}: not a readable artifact: {error}; re-export it with model.export.write_artifact") from None


# --------------------------------------------------------------------------- budget


def code_bytes(paths) -> int:
    """Total size in bytes of the given source files (each file counted once)."""
    seen, total = set(), 0
    for path in paths:
        if os.path.isdir(path):
            raise ValueError(f"code_bytes: {path} is a folder; pass the source files themselves")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"code_bytes: source file {path} does not exist; pass the files the run really uses")
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            total += os.path.getsize(real)
    return total


STRONGER_COMPRESSOR = {"zstd": "COMPRESSOR=pergroup (or brotli)", "brotli": "COMPRESSOR=pergroup"}


def check_budget(artifact_bytes: int, code_bytes: int, budget: int = Config.artifact_budget_bytes,
                 compressor: str | None = None) -> int:
    """artifact + code bytes, or ValueError (one line) when the sum exceeds the budget (decimal bytes);
    given the compressor used, the line names the one to try next."""
    total = artifact_bytes + code_bytes
    if total > budget:
        if compressor in STRONGER_COMPRESSOR:
            advice = f"export again with {STRONGER_COMPRESSOR[compressor]}, or shrink the model"
        elif compressor is not None:
            advice = (f"{compressor} is the strongest compressor here; shrink the model (fewer or narrower layers, "
                      f"smaller tables, EMBED_BITS) or the code and export again")
        else:
            advice = "shrink the model (fewer or narrower layers, smaller tables) or the code and export again"
        raise ValueError(
            f"artifact {artifact_bytes:,} + code {code_bytes:,} = {total:,} bytes exceeds the {budget:,}-byte budget "
            f"by {total - budget:,}; {advice}"
        )
    return total
