"""Artifact compressors (model/compressors.py, model/pergroup.py, model/export.py): every coder and
container round-trips bit-exact, the L1 chain is the greedy chain, permutations restore the rows,
lrzip only when present, and damaged containers give one line."""
import os
import subprocess
import sys

import pytest
import torch

from model import compressors, export, pergroup
from model.config import PERGROUP_CODERS, Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_chain(rows: list[list[int]]) -> list[int]:
    """The greedy L1 nearest-neighbour chain by pairs: start at 0, nearest unused next, ties lowest index."""
    order, used = [0], {0}
    while len(order) < len(rows):
        last = rows[order[-1]]
        best = min((sum(abs(a - b) for a, b in zip(last, rows[j])), j) for j in range(len(rows)) if j not in used)
        order.append(best[1])
        used.add(best[1])
    return order


@pytest.mark.parametrize("n,d,span,seed", [(1, 4, 3, 0), (2, 3, 1, 1), (17, 5, 2, 2), (40, 8, 3, 3), (33, 16, 127, 4)])
def test_l1_chain_is_the_greedy_chain(n, d, span, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-span, span + 1, (n, d), generator=g, dtype=torch.int8)  # small spans: many ties
    assert pergroup.l1_chain(rows).tolist() == brute_force_chain(rows.tolist())


def test_l1_chain_batched_over_layers_and_chunked(monkeypatch):
    g = torch.Generator().manual_seed(9)
    rows = torch.randint(-2, 3, (3, 25, 6), generator=g, dtype=torch.int8)
    monkeypatch.setattr(pergroup, "DISTANCE_CHUNK_ELEMENTS", 64)  # a few rows per cdist call
    chains = pergroup.l1_chain(rows)
    assert chains.shape == (3, 25)
    for layer in range(3):
        assert chains[layer].tolist() == brute_force_chain(rows[layer].tolist())


@pytest.mark.parametrize("coder", ["zstd", "brotli"])
def test_byte_coders_round_trip(coder):
    raw = bytes(range(256)) * 50 + b"tail"
    blob = compressors.encode(raw, coder)
    assert compressors.decode(blob) == raw and len(blob) < len(raw)
    assert compressors.decode(compressors.encode(b"", coder)) == b""


def test_lrzip_only_when_on_path(monkeypatch):
    monkeypatch.setattr(compressors.shutil, "which", lambda name: None)
    with pytest.raises(compressors.CoderMissing, match="lrzip is not on PATH"):
        compressors.encode(b"abc", "lrzip")
    with pytest.raises(ValueError, match="lrzip group coder was asked for but lrzip is not on PATH"):
        export.write_artifact({}, "/nonexistent/a.ptz", fp32_names=(), int6_names=(), compressor="pergroup",
                              group_coder="lrzip")


def test_the_config_offers_every_group_coder():
    assert set(PERGROUP_CODERS) == set(compressors.CODERS)


def test_the_trainer_codes_groups_with_pergroup_coder(monkeypatch):
    class Model:  # what write_model_artifact reads of a model
        def state_dict(self):
            return {}

        def control_tensor_names(self):
            return set()

        def int6_matrix_names(self):
            return set()

    seen = []
    monkeypatch.setattr(export, "write_artifact", lambda *args, **kwargs: seen.append(kwargs["group_coder"]) or 0)
    cfg = Config(compressor="pergroup", pergroup_coder="zstd")
    export.write_model_artifact(Model(), "unused.ptz", cfg)
    export.write_model_artifact(Model(), "unused.ptz", cfg, group_coder="brotli")  # an explicit coder wins
    assert seen == ["zstd", "brotli"]


@pytest.mark.skipif(not compressors.lrzip_available(), reason="lrzip is not on PATH")
def test_lrzip_round_trip():
    raw = bytes(range(256)) * 40
    assert compressors.decode(compressors.encode(raw, "lrzip")) == raw


def frontier_state_dict(layers: int = 2, seed: int = 0) -> tuple[dict, dict]:
    """A small state dict with the frontier's names (hot and cold groups, a gate, fp16, raw) and its Hessians."""
    g = torch.Generator().manual_seed(seed)
    dim, kv, hidden, vocab = 64, 32, 1100, 1030  # > 65,536 elements each, so every group holds GPTQ codes
    sd = {"tok_emb.weight": (0.02 * torch.randn(vocab, dim, generator=g)).bfloat16()}
    for i in range(layers):
        p = f"blocks.{i}."
        sd[p + "attn.c_q.weight"] = torch.randn(dim * 17, dim, generator=g)
        sd[p + "attn.c_k.weight"] = torch.randn(kv * 33, dim, generator=g)
        sd[p + "attn.c_v.weight"] = torch.randn(kv * 33, dim, generator=g)
        sd[p + "attn.proj.weight"] = torch.randn(dim * 17, dim, generator=g)  # tall: GPTQ's column loop stays short
        sd[p + "mlp.fc.weight"] = torch.randn(hidden, dim, generator=g)
        sd[p + "mlp.proj.weight"] = torch.randn(hidden, dim, generator=g)
        sd[p + "attn.attn_gate_w"] = torch.randn(8, 12, generator=g)
        sd[p + "attn.q_gain"] = torch.full((8,), 5.0)
    sd["step_counter"] = torch.tensor([3, 4], dtype=torch.int64)
    hessians = {n: torch.eye(t.shape[-1]) + 0.1 for n, t in sd.items() if t.is_floating_point() and t.numel() > 65536}
    return sd, hessians


@pytest.fixture(scope="module")
def frontier_export():
    sd, hessians = frontier_state_dict()
    int6 = [n for n in sd if n.endswith(".weight") and n != "tok_emb.weight"]
    gates = [n for n in sd if n.endswith("attn_gate_w")]
    controls = [n for n in sd if n.endswith("q_gain")]
    payload, _ = export.quantize_state_dict_gptq(sd, fp32_names=controls, int6_names=int6, hessians=hessians,
                                                 gate_names=gates, cfg=Config(lqer_enabled=True, lqer_top_k=2),
                                                 device="cpu")
    return sd, payload


@pytest.fixture(scope="module")
def frontier_payload(frontier_export):
    return frontier_export[1]


def assert_same_payload(a: dict, b: dict) -> None:
    assert a["format"] == b["format"] and list(a["tensors"]) == list(b["tensors"])
    for name, entry in a["tensors"].items():
        other = b["tensors"][name]
        assert set(entry) == set(other), name
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == other[key].dtype and value.shape == other[key].shape, (name, key)
                assert torch.equal(value.view(torch.uint8) if value.dim() else value, other[key].view(torch.uint8) if value.dim() else other[key]), (name, key)
            else:
                assert value == other[key], (name, key)


def test_the_payload_holds_every_class(frontier_export):
    sd, payload = frontier_export
    entries = payload["tensors"]
    classes = {name: entry["class"] for name, entry in entries.items()}
    assert set(classes.values()) == {"gptq", "int8", "fp16", "raw"}
    assert classes["tok_emb.weight"] == classes["blocks.1.mlp.proj.weight"] == "gptq"
    assert classes["blocks.0.attn.q_gain"] == "fp16"  # small control tensors too (FRONTIER: every small float tensor)
    assert sum("lqer_a" in e for e in entries.values()) == 2
    restored = export.dequantize_state_dict(payload)
    assert restored["blocks.0.attn.q_gain"].dtype == torch.float32 and restored["tok_emb.weight"].dtype == torch.bfloat16
    gate = entries["blocks.0.attn.attn_gate_w"]  # int8 per row: s = fp16(max|row| / 127), error <= s / 2
    assert classes["blocks.0.attn.attn_gate_w"] == "int8" and gate["q"].dtype == torch.int8
    w, s = sd["blocks.0.attn.attn_gate_w"], gate["scale"].float()[:, None]
    assert torch.equal(gate["scale"], (w.abs().amax(1) / 127).half())
    assert ((w - gate["q"].float() * s).abs() <= s / 2 + 1e-7).all()
    assert int(gate["q"].abs().max()) <= 127


@pytest.mark.parametrize("compressor,coder", [("brotli", None), ("pergroup", "brotli"), ("pergroup", "zstd")])
def test_containers_round_trip_bit_exact(frontier_payload, compressor, coder):
    import io

    if compressor == "brotli":  # brotli q11 over the whole payload takes seconds: half of it covers every class
        names = [n for n in frontier_payload["tensors"] if not n.startswith("blocks.1.")]
        frontier_payload = dict(frontier_payload, tensors={n: frontier_payload["tensors"][n] for n in names})
    out = io.BytesIO()
    export._encode_into(frontier_payload, out, compressor=compressor, level=3, group_coder=coder or "brotli")
    blob = out.getvalue()
    if compressor == "pergroup":
        assert blob.startswith(b"PGRP") and pergroup.unpack(blob).get("meta") is None
        assert_same_payload(pergroup.unpack(blob), frontier_payload)
    else:
        assert_same_payload(export.deserialize(compressors.decode(blob)), frontier_payload)
    restored = export.artifact_from_bytes(blob)
    expected = export.dequantize_state_dict(frontier_payload)
    assert all(torch.equal(restored[n], expected[n]) and restored[n].dtype == expected[n].dtype for n in expected)


def test_pergroup_layout_permutations_restore_the_rows(frontier_payload):
    blob = pergroup.pack(frontier_payload, "zstd", zstd_level=3)
    lengths = torch.frombuffer(bytearray(blob[8:8 + 4 * 9]), dtype=torch.int32).tolist()
    offsets = [44 + sum(lengths[:i]) for i in range(9)]
    streams = [blob[o:o + n] for o, n in zip(offsets, lengths)]
    groups = pergroup.grouped_names(frontier_payload)
    assert groups[2] == ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight"] and groups[0] == ["tok_emb.weight"]
    perms = compressors.decode(streams[8])
    # the c_q group: each layer's rows in the L1 chain's order, written column-major
    raw = compressors.decode(streams[2])
    q0 = frontier_payload["tensors"]["blocks.0.attn.c_q.weight"]["q"]
    chain = pergroup.l1_chain(q0)
    assert chain.tolist() != list(range(q0.shape[0]))  # a real reordering
    assert raw[: q0.numel()] == q0[chain].T.contiguous().numpy().tobytes()
    tok_rows = frontier_payload["tensors"]["tok_emb.weight"]["q"].shape[0]
    stored = torch.frombuffer(bytearray(perms[2 * tok_rows: 2 * tok_rows + 2 * q0.shape[0]]), dtype=torch.int16)
    assert stored.long().tolist() == chain.tolist()  # permutations in (group, layer) order, uint16
    # a cold group is not reordered, only transposed
    k0 = frontier_payload["tensors"]["blocks.0.attn.c_k.weight"]["q"]
    assert compressors.decode(streams[1])[: k0.numel()] == k0.T.contiguous().numpy().tobytes()


def test_damaged_containers_are_one_line(frontier_payload, tmp_path):
    blob = pergroup.pack(frontier_payload, "zstd", zstd_level=3)
    for label, data in {"truncated": blob[:-5], "extended": blob + b"x", "header": b"PGRP\x01"}.items():
        path = tmp_path / f"{label}.ptz"
        path.write_bytes(data)
        with pytest.raises(ValueError) as info:
            export.read_artifact(str(path))
        assert str(info.value).startswith(f"{path}: not a readable artifact") and "\n" not in str(info.value), label


PACK_IN_A_FRESH_PROCESS = """
import hashlib, torch
from model import export, pergroup
from model.config import load_config
from model.gpt import GPT
cfg, _ = load_config(["--preset", "frontier-smoke"], environ={})
torch.manual_seed(0)
model = GPT(cfg)
payload, _ = export.quantize_state_dict(model.state_dict(), fp32_names=model.control_tensor_names(),
                                        int6_names=model.int6_matrix_names())
print(hashlib.sha256(pergroup.pack(payload, "zstd", zstd_level=1)).hexdigest())
"""


@pytest.mark.slow  # two fresh processes importing torch
def test_the_container_bytes_do_not_depend_on_the_process():
    """Python hashes strings with a per-process seed, so anything that iterates a set of names
    would give each run other bytes for the same weights."""
    digests = set()
    for seed in ("1", "2"):
        environ = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-c", PACK_IN_A_FRESH_PROCESS], cwd=REPO, env=environ,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        digests.add(result.stdout.strip())
    assert len(digests) == 1, digests
