"""The artifact (model/export.py): classes, quantisation bounds, round trip, sizes, atomic write, budget.

State dicts are built here with model/gpt.py's names (random values), not from the model itself;
test_state_dict_and_declarations_are_the_models checks both against a built model.
"""
import errno
import inspect
import os

import pytest
import torch

import kernels
from kernels import reference
from model import atomic, export
from model.atomic import WriteFailed
from model.config import Config
from model.gpt import GPT

SMALL = dict(vocab=257, dim=256, heads=4, kv_heads=2, mlp_hidden=768, layers=2,
             bigram_buckets=601, bigram_dim=128, ve_dim=128)
DEFAULT = dict(vocab=1024, dim=512, heads=8, kv_heads=4, mlp_hidden=1536, layers=11,
               bigram_buckets=2048, bigram_dim=128, ve_dim=128)
DEFAULT_PARAMETERS = 26_993_756  # SPEC.md "size"
FAST_LEVEL = 3  # for tests about layout rather than zstd-22's ratio


@pytest.fixture(autouse=True)
def reference_backend():
    # int6 goes through the public kernel API; in Triton's interpreter a Triton kernel would make these
    # tests slow, so they pin the reference; test_int6_values_equal_reference covers both backends.
    with kernels.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def default_state_dict():
    return make_state_dict(DEFAULT, seed=7)


def make_state_dict(cfg: dict, seed: int = 0, matrix_std: float = 1.0) -> dict:
    """A random state dict with gpt.py's names, shapes and storage dtypes for the given sizes."""
    g = torch.Generator().manual_seed(seed)
    dim, kv_dim = cfg["dim"], cfg["dim"] // cfg["heads"] * cfg["kv_heads"]

    def randn(*shape, dtype=torch.float32, std=matrix_std):
        return (torch.randn(shape, generator=g) * std).to(dtype)

    sd = {
        "tok_emb.weight": randn(cfg["vocab"], dim, dtype=torch.bfloat16),
        "bigram.table": randn(cfg["bigram_buckets"], cfg["bigram_dim"], dtype=torch.bfloat16),
        "bigram.proj.weight": randn(dim, cfg["bigram_dim"]),
        "bigram.scale": randn(std=0.05),
        "smear.gate": randn(dim, std=0.1),
        "ve.table": randn(cfg["vocab"], cfg["ve_dim"], dtype=torch.bfloat16),
        "ve.proj.weight": randn(kv_dim, cfg["ve_dim"]),
        "ve.scale": randn(std=0.1),
        "ve.layer_scales": randn(2),
    }
    for i in range(cfg["layers"]):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = randn(dim, dim)
        sd[p + "attn.c_k.weight"] = randn(kv_dim, dim)
        sd[p + "attn.c_v.weight"] = randn(kv_dim, dim)
        sd[p + "attn.proj.weight"] = randn(dim, dim)
        sd[p + "attn.q_gain"] = randn(cfg["heads"])
        sd[p + "mlp.fc.weight"] = randn(cfg["mlp_hidden"], dim)
        sd[p + "mlp.proj.weight"] = randn(dim, cfg["mlp_hidden"])
        sd[p + "attn_scale"] = randn(dim)
        sd[p + "mlp_scale"] = randn(dim)
        sd[p + "resid_mix"] = randn(2, dim)
    sd["skip_weights"] = randn(cfg["layers"] // 2, dim)
    return sd


def declared(cfg: dict) -> dict:
    """The exporter's arguments that GPT declares for make_state_dict(cfg)'s names."""
    fp32 = {"bigram.scale", "smear.gate", "ve.scale", "ve.layer_scales", "skip_weights"}
    int6 = set()
    for i in range(cfg["layers"]):
        p = f"blocks.{i}."
        fp32 |= {p + "attn.q_gain", p + "attn_scale", p + "mlp_scale", p + "resid_mix"}
        int6 |= {p + n for n in ("attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight")}
        int6 |= {p + "mlp.fc.weight", p + "mlp.proj.weight"}
    return dict(fp32_names=fp32, int6_names=int6)


def names(fp32=(), int6=()) -> dict:
    """The exporter's declaration arguments for a hand-made state dict."""
    return dict(fp32_names=set(fp32), int6_names=set(int6))


def entry_deq_fp32(entry) -> torch.Tensor:
    """q * scale of an int6/int8 payload entry, exact in fp32 (q has <= 8 bits, scale is fp16)."""
    return entry["q"].float() * entry["scale"].float()[:, None]


# --------------------------------------------------------------------------- classes


def test_classes_of_the_model_names():
    sd = make_state_dict(SMALL)
    expected = {
        "tok_emb.weight": "int8",  # 257 x 256 = 65,792: just above the small-tensor limit
        "bigram.table": "int8",
        "ve.table": "fp16",  # 257 x 128: a small matrix
        "bigram.proj.weight": "fp16",
        "ve.proj.weight": "fp16",
        "blocks.0.attn.c_q.weight": "fp16",  # 256 x 256 = 65,536: exactly at the limit, so small
        "blocks.0.mlp.fc.weight": "int6",
        "blocks.1.mlp.proj.weight": "int6",
        "bigram.scale": "fp32",
        "smear.gate": "fp32",
        "ve.scale": "fp32",
        "ve.layer_scales": "fp32",
        "blocks.0.attn.q_gain": "fp32",
        "blocks.0.attn_scale": "fp32",
        "blocks.1.mlp_scale": "fp32",
        "blocks.0.resid_mix": "fp32",  # 2-D, but a control tensor
        "skip_weights": "fp32",
    }
    for name, cls in expected.items():
        assert export.tensor_class(name, sd[name], **declared(SMALL)) == cls, name
    payload, _ = export.quantize_state_dict(sd, **declared(SMALL))
    assert {name: payload["tensors"][name]["class"] for name in expected} == expected


def test_state_dict_and_declarations_are_the_models():
    cfg = Config(vocab_size=257, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=3,
                 bigram_vocab_size=601, bigram_dim=128, ve_dim=128, ve_layers="0,1", xsa_last_n=1)
    model = GPT(cfg)
    sd = make_state_dict(SMALL)
    assert {n: (t.shape, t.dtype) for n, t in sd.items()} == {n: (t.shape, t.dtype) for n, t in model.state_dict().items()}
    assert declared(SMALL) == dict(fp32_names=model.control_tensor_names(), int6_names=model.int6_matrix_names())


def test_default_names_and_sizes(default_state_dict):
    full, kw = default_state_dict, declared(DEFAULT)
    assert sum(t.numel() for t in full.values()) == DEFAULT_PARAMETERS
    assert export.tensor_class("blocks.3.attn.c_k.weight", full["blocks.3.attn.c_k.weight"], **kw) == "int6"
    assert export.tensor_class("ve.table", full["ve.table"], **kw) == "int8"
    assert export.tensor_class("bigram.proj.weight", full["bigram.proj.weight"], **kw) == "fp16"  # 512 x 128 = 65,536
    assert export.tensor_class("step", torch.tensor(7), **kw) == "raw"


@pytest.mark.parametrize(
    "name",
    ["skip_gates", "blocks.0.attn_scale.x", "blocks.0.resid_mix.x", "blocks.0.q_gain.x", "blocks.0.smear.x",
     "blocks.0.x.scale", "blocks.0.layer_scales.x", "blocks.0.other.x"],
)
def test_a_declared_control_matrix_is_fp32_whatever_its_name(name):
    # 0/1-D tensors are fp32 anyway, so 2-D ones show the declaration doing its work; the names
    # include the parts the exporter once guessed from, which no longer count by themselves.
    matrix = torch.randn(8, 5)
    assert export.tensor_class(name, matrix, **names(fp32=[name])) == "fp32"
    assert export.tensor_class(name, matrix, **names()) == "fp16"
    large = torch.randn(300, 257)  # a control tensor is never quantised, whatever its size
    assert export.tensor_class(name, large, **names(fp32=[name])) == "fp32"
    assert export.tensor_class(name, large, **names()) == "int8"


def test_skip_gates_declared_fp32_round_trip_exactly():
    # A frontier control tensor [8, 512] that the old name rule stored in fp16.
    sd = {"skip_gates": torch.randn(8, 512, generator=torch.Generator().manual_seed(9)) * 0.37}
    payload, report = export.quantize_state_dict(sd, **names(fp32=["skip_gates"]))
    assert payload["tensors"]["skip_gates"]["class"] == "fp32" and report["fp32"]["tensors"] == 1
    blob, _ = export.artifact_to_bytes(sd, **names(fp32=["skip_gates"]), level=FAST_LEVEL)
    assert torch.equal(export.artifact_from_bytes(blob)["skip_gates"], sd["skip_gates"])
    payload, _ = export.quantize_state_dict(sd, **names())
    assert payload["tensors"]["skip_gates"]["class"] == "fp16"  # undeclared: no guess from the name


def test_int6_only_for_declared_large_matrices():
    w = torch.randn(300, 257)
    assert export.tensor_class("blocks.0.mlp.fc.weight", w, **names(int6=["blocks.0.mlp.fc.weight"])) == "int6"
    assert export.tensor_class("blocks.0.mlp.fc.weight", w, **names()) == "int8"  # no guess from ".mlp."
    assert export.tensor_class("banks.qo", w, **names(int6=["banks.qo"])) == "int6"
    small = torch.randn(256, 256)  # 65,536 elements: small, so fp16 even when declared int6
    assert export.tensor_class("blocks.0.attn.c_q.weight", small, **names(int6=["blocks.0.attn.c_q.weight"])) == "fp16"


def test_declarations_must_fit_the_state_dict(tmp_path):
    sd = {"skip_weights": torch.randn(5, 8), "blocks.0.mlp.fc.weight": torch.randn(300, 257)}
    with pytest.raises(TypeError):
        export.quantize_state_dict(sd)  # no declarations: required, never guessed
    with pytest.raises(ValueError, match=r"fp32_names declares \['_orig_mod.skip_weights'\] that the state dict does not hold"):
        export.quantize_state_dict(sd, **names(fp32=["_orig_mod.skip_weights"]))
    with pytest.raises(ValueError, match=r"int6_names declares \['blocks.1.mlp.fc.weight'\]"):
        export.write_artifact(sd, str(tmp_path / "a.ptz"), **names(int6=["blocks.1.mlp.fc.weight"]), level=FAST_LEVEL)
    with pytest.raises(ValueError, match="declared both fp32 and int6"):
        export.quantize_state_dict(sd, **names(fp32=["skip_weights"], int6=["skip_weights"]))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- round trip and bounds


def test_round_trip_restores_names_shapes_dtypes_and_bounds():
    sd = make_state_dict(SMALL)
    sd["step"] = torch.tensor([3, -1, 2**40], dtype=torch.int64)
    sd["flags"] = torch.tensor([True, False, True])
    payload, _ = export.quantize_state_dict(sd, **declared(SMALL))
    out = export.dequantize_state_dict(payload)
    assert list(out) == list(sd)
    for name, t in sd.items():
        entry, restored = payload["tensors"][name], out[name]
        assert restored.dtype == t.dtype and restored.shape == t.shape, name
        cls = entry["class"]
        if cls in ("int6", "int8"):
            w = t.double().reshape(entry["q"].shape)
            if cls == "int8":
                clip = torch.quantile(t.float().reshape(entry["q"].shape).abs(), export.INT8_CLIP_QUANTILE, dim=1)
                w = torch.maximum(torch.minimum(w, clip.double()[:, None]), -clip.double()[:, None])
            deq = entry_deq_fp32(entry)
            bound = entry["scale"].double()[:, None] / 2 * (1 + 1e-6)
            assert ((w - deq.double()).abs() <= bound).all(), name
            assert torch.equal(restored, deq.to(t.dtype).reshape(t.shape)), name
            q_min = reference.INT6_MIN if cls == "int6" else -export.INT8_MAX
            q_max = reference.INT6_MAX if cls == "int6" else export.INT8_MAX
            assert entry["q"].dtype == torch.int8 and q_min <= entry["q"].min() and entry["q"].max() <= q_max
        elif cls == "fp16":
            assert entry["data"].dtype == torch.float16
            assert torch.equal(restored, t.to(torch.float16).to(t.dtype)), name
        else:  # fp32 control tensors and raw tensors come back bit for bit
            assert torch.equal(restored, t), name


def test_int6_values_equal_reference(device):
    # 137 x 511 = 70,007 elements: above the small-tensor limit, rows and columns ragged.
    # On the device (a GPU, else the CPU through Triton's interpreter) so the Triton kernel serves.
    w = torch.randn(137, 511, generator=torch.Generator().manual_seed(1)) * 2
    w[5] = 0.0  # a zero row
    w[9, 17] = 40.0  # an outlier row
    q_ref, scale_ref = reference.int6_quantize(w)
    for backend in kernels.BACKENDS:
        with kernels.use_backend(backend):
            payload, _ = export.quantize_state_dict(
                {"blocks.0.mlp.fc.weight": w.to(device)}, **names(int6=["blocks.0.mlp.fc.weight"])
            )
        entry = payload["tensors"]["blocks.0.mlp.fc.weight"]
        assert entry["class"] == "int6"
        assert torch.equal(entry["q"], q_ref), backend
        assert torch.equal(entry["scale"], scale_ref), backend


def test_zero_rows_survive():
    int6 = torch.randn(300, 257, generator=torch.Generator().manual_seed(2))
    int8 = torch.randn(300, 257, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    int6[0], int6[-1], int8[7] = 0.0, 0.0, 0.0
    sd = {"blocks.0.attn.c_q.weight": int6, "tok_emb.weight": int8}
    payload, _ = export.quantize_state_dict(sd, **names(int6=["blocks.0.attn.c_q.weight"]))
    out = export.dequantize_state_dict(payload)
    for name, rows in (("blocks.0.attn.c_q.weight", [0, -1]), ("tok_emb.weight", [7])):
        scale = payload["tensors"][name]["scale"]
        assert torch.isfinite(scale).all() and (scale > 0).all(), name
        for row in rows:
            assert (payload["tensors"][name]["q"][row] == 0).all(), name
            assert (out[name][row] == 0).all(), name


def test_int8_clipping_touches_only_values_above_the_percentile():
    # Rows of 1,000,003 values: the 99.99984th percentile sits at sorted position 1,000,000.4,
    # i.e. 40% of the way from the third-largest |w| to the second-largest.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 1_000_003, generator=g)
    w[0, 10], w[0, 20], w[0, 30] = 50.0, -60.0, 70.0
    payload, _ = export.quantize_state_dict({"tok_emb.weight": w}, **names())
    entry = payload["tensors"]["tok_emb.weight"]
    assert entry["class"] == "int8"
    deq, scale = entry_deq_fp32(entry), entry["scale"].float()
    half = scale / 2 * (1 + 1e-6)

    clip = export.row_quantile(w.abs(), export.INT8_CLIP_QUANTILE)  # [2]
    # 50 + 0.4 * (60 - 50) = 54, up to torch.quantile's fp32 position (spacing 1/16 near 1e6)
    assert abs(clip[0].item() - 54.0) <= 0.5
    assert abs(scale[0].item() * 127 - clip[0].item()) <= 1e-3 * clip[0].item()  # fp16 rounding of the scale
    assert abs(deq[0, 20].item() + clip[0].item()) <= half[0] and abs(deq[0, 30].item() - clip[0].item()) <= half[0]
    assert abs(deq[0, 10].item() - 50.0) <= half[0]  # below the clip: only rounded

    below = w.abs() <= clip[:, None]
    assert (~below).sum(dim=1).tolist() == [2, 2]  # the clip lies between the 3rd- and 2nd-largest |w|
    error = (w - deq).abs()
    assert (error[below] <= half[:, None].expand_as(w)[below]).all()  # untouched values: rounding error only
    above = ~below
    assert ((deq[above].abs() - clip[:, None].expand_as(w)[above]).abs() <= half[:, None].expand_as(w)[above]).all()


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, export.INT8_CLIP_QUANTILE, 1.0])
def test_quantile_routes_match_torch_quantile(monkeypatch, q):
    a = torch.rand(7, 1001, generator=torch.Generator().manual_seed(5))
    expected = torch.quantile(a, q, dim=1)
    torch.testing.assert_close(export.quantile_by_kthvalue(a, q), expected, rtol=0, atol=1e-7)
    monkeypatch.setattr(export, "QUANTILE_MAX_ELEMENTS", 3000)  # chunks of 2 rows
    torch.testing.assert_close(export.row_quantile(a, q), expected, rtol=0, atol=1e-7)
    monkeypatch.setattr(export, "QUANTILE_MAX_ELEMENTS", 1000)  # a row longer than the cap: kthvalue
    torch.testing.assert_close(export.row_quantile(a, q), expected, rtol=0, atol=1e-7)


def test_small_matrix_that_overflows_fp16_is_kept_in_fp32():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    w[3, 3] = 1e6
    payload, report = export.quantize_state_dict({"blocks.0.attn.c_q.weight": w}, **names(int6=["blocks.0.attn.c_q.weight"]))
    assert payload["tensors"]["blocks.0.attn.c_q.weight"]["class"] == "fp32"
    assert report["fp32"]["tensors"] == 1 and report["fp16"]["tensors"] == 0
    assert torch.equal(export.dequantize_state_dict(payload)["blocks.0.attn.c_q.weight"], w)


def test_non_finite_weights_are_refused():
    w = torch.randn(300, 300)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight holds NaN or inf"):
        export.quantize_state_dict({"blocks.0.mlp.fc.weight": w}, **names(int6=["blocks.0.mlp.fc.weight"]))


# --------------------------------------------------------------------------- files and sizes


def test_write_read_artifact_and_size_accounting(tmp_path):
    sd = make_state_dict(SMALL)
    sd["step"] = torch.tensor(1234, dtype=torch.int64)  # a non-float entry travels as is
    path = tmp_path / "model.ptz"
    report = {}
    size = export.write_artifact(sd, str(path), **declared(SMALL), report=report)  # the config's level, 22
    assert size == os.path.getsize(path)
    blob, report_in_memory = export.artifact_to_bytes(sd, **declared(SMALL), level=FAST_LEVEL)
    assert report == report_in_memory
    # the in-memory path gives the file's bytes (deterministic output)
    assert export.write_artifact(sd, str(tmp_path / "fast.ptz"), **declared(SMALL), level=FAST_LEVEL) == len(blob)
    assert (tmp_path / "fast.ptz").read_bytes() == blob
    (tmp_path / "fast.ptz").unlink()

    payload, _ = export.quantize_state_dict(sd, **declared(SMALL))
    expected = export.dequantize_state_dict(payload)
    restored = export.read_artifact(str(path))
    assert list(restored) == list(sd)
    for name in sd:
        assert torch.equal(restored[name], expected[name]), name
    assert list(tmp_path.iterdir()) == [path]  # no temp file left beside it

    # the report adds up, and the serialised size is exactly the stored bytes plus the header
    classes = [report[c] for c in export.CLASSES]
    for key in ("tensors", "elements", "bytes_before", "bytes_after"):
        assert report["total"][key] == sum(row[key] for row in classes)
    assert report["total"]["tensors"] == len(sd)
    assert report["total"]["elements"] == sum(t.numel() for t in sd.values())
    assert report["total"]["bytes_before"] == sum(t.numel() * t.element_size() for t in sd.values())
    raw = export.serialize(payload)
    header_len = int.from_bytes(raw[len(export.MAGIC) : len(export.MAGIC) + 8], "little")
    assert len(raw) == len(export.MAGIC) + 8 + header_len + report["total"]["bytes_after"]
    assert report["int6"]["bytes_after"] == report["int6"]["elements"] + 2 * (2 * 768 + 2 * 256)  # int8 values + fp16 scales
    lines = export.format_report(report, compressed_bytes=size)
    assert len(lines) == 7 and all("\n" not in line for line in lines) and f"{size:,}" in lines[-1]


def _entropy_bytes(q: torch.Tensor) -> float:
    """Order-0 (empirical histogram) entropy of the values of q, in bytes."""
    counts = torch.bincount((q.reshape(-1).long() + 128)).double()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def test_default_size_compressed_size_is_near_the_entropy(default_state_dict):
    # Gaussian weights are i.i.d., so zstd cannot beat the order-0 entropy of the quantised values
    # by more than noise, and should get within a few percent of it. (Level 3: zstd-22 runs at about
    # 1 MB/s on this CPU, too slow for 27 MB in a unit test; level 22 is tested on the small dict.)
    payload, report = export.quantize_state_dict(default_state_dict, **declared(DEFAULT))
    size = len(export._compressor(FAST_LEVEL).compress(export.serialize(payload)))
    entries = payload["tensors"].values()
    q_entropy = sum(_entropy_bytes(e["q"]) for e in entries if "q" in e)
    other = sum(e[f].numel() * e[f].element_size() for e in entries for f in ("scale", "data") if f in e)
    assert report["total"]["elements"] == DEFAULT_PARAMETERS
    assert 0.99 * q_entropy <= size <= 1.05 * q_entropy + other + 65_536
    assert size < 0.8 * report["total"]["bytes_after"]  # well below one byte per quantised value


def test_int6_compresses_smaller_than_int8_per_element():
    w = torch.randn(256, 768, generator=torch.Generator().manual_seed(8)) * 0.5
    sizes = {}
    for cls, name, kw in (("int6", "blocks.0.mlp.fc.weight", names(int6=["blocks.0.mlp.fc.weight"])),
                          ("int8", "tok_emb.weight", names())):
        payload, _ = export.quantize_state_dict({name: w}, **kw)
        assert payload["tensors"][name]["class"] == cls
        sizes[cls] = len(export._compressor(22).compress(export.serialize(payload)))
    # The same weights: int6 has 64 levels per row, int8 254, about 2 bits more per value.
    assert sizes["int6"] < 0.85 * sizes["int8"], sizes


class _Interrupted(BaseException):
    """Stands for Ctrl-C: not an Exception, so only a bare cleanup path catches it."""


class _CompressorFailingMidway:
    """Writes part of the first chunk into the file it is given, then fails (as a full disk would)."""

    def __init__(self, folder, seen: list):
        self.folder, self.seen = folder, seen

    def stream_writer(self, out, size=-1, closefd=True):
        compressor = self

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def write(self, data):
                out.write(bytes(data[:100]))
                out.flush()
                compressor.seen.extend(os.listdir(compressor.folder))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return Writer()


def two_tensors() -> tuple[dict, dict]:
    """A small state dict with one int6 matrix and one control matrix, and its declarations."""
    sd = {"blocks.0.mlp.fc.weight": torch.randn(300, 257), "skip_weights": torch.randn(5, 8)}
    return sd, names(fp32=["skip_weights"], int6=["blocks.0.mlp.fc.weight"])


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    sd, kw = two_tensors()
    path = tmp_path / "model.ptz"

    seen = []
    monkeypatch.setattr(export, "_compressor", lambda level: _CompressorFailingMidway(tmp_path, seen))
    with pytest.raises(WriteFailed, match="No space left"):
        export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL)
    assert len(seen) == 1 and seen[0].endswith(".tmp")  # a partial temp file existed midway...
    assert list(tmp_path.iterdir()) == []  # ...and is gone, with nothing at path
    monkeypatch.undo()

    def interrupted(fd):
        raise _Interrupted()

    monkeypatch.setattr(atomic.os, "fsync", interrupted)  # the whole frame written, then Ctrl-C
    with pytest.raises(_Interrupted):
        export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    size = export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL)  # an earlier artifact stays intact
    before = path.read_bytes()

    def replace_fails(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", replace_fails)
    with pytest.raises(WriteFailed, match="rename failed"):
        export.write_artifact({"skip_weights": torch.zeros(5, 8)}, str(path), **names(), level=FAST_LEVEL)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before and len(before) == size


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_old_artifact(tmp_path, monkeypatch):
    sd, kw = two_tensors()
    path = tmp_path / "model.ptz"
    export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL)
    before = path.read_bytes()

    seen = []
    monkeypatch.setattr(export, "_compressor", lambda level: _CompressorFailingMidway(tmp_path, seen))
    with pytest.raises(WriteFailed) as info:  # a write of the new frame hits ENOSPC midway
        export.write_artifact({"skip_weights": torch.zeros(5, 8)}, str(path), **names(), level=FAST_LEVEL)
    message = str(info.value)
    assert message.startswith(f"could not write {path}: No space left on device;") and "\n" not in message
    assert info.value.__cause__.errno == errno.ENOSPC
    assert any(name.endswith(".tmp") for name in seen)  # the temp file existed midway
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before  # gone, old file unchanged


def test_corrupt_or_foreign_files_give_one_clear_error(tmp_path):
    sd, kw = two_tensors()
    good = tmp_path / "good.ptz"
    export.write_artifact(sd, str(good), **kw, level=FAST_LEVEL)
    blob = good.read_bytes()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    foreign = export._compressor(FAST_LEVEL).compress(b"just some text, not an artifact" * 10)
    bad_header = b'{"format":"%s","tensors":[{"name":"x","cls":"fp32"}]}' % export.FORMAT.encode()
    malformed = export._compressor(FAST_LEVEL).compress(export.MAGIC + len(bad_header).to_bytes(8, "little") + bad_header)
    cases = {
        "empty": b"",
        "text": b"hello, world\n" * 50,
        "truncated": blob[: len(blob) // 2],
        "flipped": bytes(flipped),
        "foreign": foreign,
        "malformed": malformed,
    }
    for label, data in cases.items():
        path = tmp_path / f"{label}.ptz"
        path.write_bytes(data)
        with pytest.raises(ValueError) as info:
            export.read_artifact(str(path))
        message = str(info.value)
        assert message.startswith(f"{path}: not a readable artifact") and "\n" not in message, (label, message)
    with pytest.raises(ValueError, match="artifact marker"):
        export.read_artifact(str(tmp_path / "foreign.ptz"))


def test_bad_level_is_refused_and_the_default_is_the_configs(tmp_path):
    for function in (export.write_artifact, export.artifact_to_bytes):
        assert inspect.signature(function).parameters["level"].default == Config.zstd_level == 22
    with pytest.raises(ValueError, match="zstd level 23 is not an integer in 1..22; use 22 for the artifact"):
        export.write_artifact({"skip_weights": torch.zeros(2)}, str(tmp_path / "a.ptz"), **names(), level=23)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- budget


def test_check_budget_message_and_pass():
    with pytest.raises(ValueError) as info:
        export.check_budget(15_900_000, 200_000)
    message = str(info.value)
    assert message.startswith(
        "artifact 15,900,000 + code 200,000 = 16,100,000 bytes exceeds the 16,000,000-byte budget by 100,000;"
    )
    assert "\n" not in message
    assert export.check_budget(15_800_000, 200_000) == 16_000_000  # exactly at the budget passes
    assert Config.artifact_budget_bytes == 16_000_000  # the default budget is the config's (SPEC "Export")
    assert export.check_budget(1_000, 24, budget=1_024) == 1_024
    with pytest.raises(ValueError, match="by 1;"):
        export.check_budget(1_000, 25, budget=1_024)


def test_code_bytes(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")  # 6 bytes
    b.write_bytes("π = 3\n".encode())  # 7 bytes: counted in bytes, not characters
    assert export.code_bytes([str(a), str(b)]) == 13
    assert export.code_bytes([str(a), str(a), str(tmp_path / "." / "a.py")]) == 6  # each file once
    assert export.code_bytes([]) == 0
    with pytest.raises(FileNotFoundError, match="missing.py does not exist"):
        export.code_bytes([str(a), str(tmp_path / "missing.py")])
    with pytest.raises(ValueError, match="is a folder"):
        export.code_bytes([str(tmp_path)])
    assert export.code_bytes([export.__file__]) == os.path.getsize(export.__file__)


def test_over_the_budget_the_export_stops_and_leaves_nothing(tmp_path):
    sd, kw = two_tensors()
    path = tmp_path / "model.ptz"
    size = len(export.artifact_to_bytes(sd, **kw, level=FAST_LEVEL)[0])
    with pytest.raises(ValueError) as info:
        export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL, code_bytes=1_000, budget=size + 999)
    message = str(info.value)
    assert "\n" not in message and f"exceeds the {size + 999:,}-byte budget by 1;" in message
    assert "COMPRESSOR=pergroup" in message  # the compressor to try next
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file
    assert export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL, code_bytes=1_000, budget=size + 1_000) == size
    before = path.read_bytes()
    with pytest.raises(ValueError, match="pergroup is the strongest compressor here"):
        export.write_artifact(sd, str(path), **kw, level=FAST_LEVEL, compressor="pergroup", code_bytes=10**9)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before  # the earlier artifact stays


def test_gptq_export_refuses_what_it_cannot_quantise_in_one_line():
    sd = {"blocks.0.mlp.fc.weight": torch.randn(300, 257), "bigram.table": torch.randn(700, 128),
          "blocks.0.attn.attn_gate_w": torch.randn(8, 12)}
    int6, hessians = ["blocks.0.mlp.fc.weight"], {"blocks.0.mlp.fc.weight": torch.eye(257)}
    assert export.gptq_names(sd) == ["blocks.0.mlp.fc.weight", "bigram.table"]
    cases = [
        (dict(hessians=hessians), "needs a Hessian for bigram.table"),
        (dict(hessians={**hessians, "bigram.table": torch.eye(128)}), "no role for bigram.table"),
        (dict(hessians={**hessians, "bigram.table": torch.eye(127)}), r"Hessian of bigram.table is \(127, 127\)"),
        (dict(hessians=hessians, gate_names=["blocks.1.attn.attn_gate_w"]), "gate_names declares"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            export.quantize_state_dict_gptq(sd, fp32_names=(), int6_names=int6, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="NaN or inf"):
        export.quantize_state_dict_gptq({"x": torch.tensor([float("nan")])}, fp32_names=(), int6_names=(), hessians={})
