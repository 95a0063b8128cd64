"""LQER (model/lqer.py): the correction lowers ||E||_F, the codes stay in their ranges, the scales
follow FRONTIER's rules, the per-row fallback, and the export applies it at load."""
import dataclasses

import pytest
import torch

from model import export, gptq, lqer
from model.config import Config


def quantisation_error(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) + 0.5 * torch.randn(rows, 3, generator=g) @ torch.randn(3, cols, generator=g)
    q, scale = gptq.round_to_nearest(W, 4, 6.0)
    return W - q.float() * scale.float()[:, None]


@pytest.mark.parametrize("rows,cols", [(96, 128), (40, 192)])
def test_asymmetric_codes_in_range_and_the_error_drops(rows, cols):
    E = quantisation_error(rows, cols)
    f = lqer.factorize(E, 4, asym=True, group=64)
    assert f["lqer_a"].shape == (rows, 4) and f["lqer_b"].shape == (4, cols)
    assert f["lqer_a"].dtype == f["lqer_b"].dtype == torch.int8
    assert int(f["lqer_a"].min()) >= -2 and int(f["lqer_a"].max()) <= 1  # int2
    assert int(f["lqer_b"].min()) >= -8 and int(f["lqer_b"].max()) <= 7  # int4
    assert f["lqer_a_scale"].dim() == 0 and f["lqer_b_scale"].shape == (4 * cols // 64,)
    assert f["lqer_a_scale"].dtype == f["lqer_b_scale"].dtype == torch.float16
    # the scales are FRONTIER's: max|A| / 1.5 and max|group| / 7.5, from the SVD's A and B
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    A, B = U[:, :4] * S[:4], Vh[:4]
    assert f["lqer_a_scale"] == (A.abs().max() / 1.5).half()
    assert torch.equal(f["lqer_b_scale"], (B.reshape(-1, 64).abs().amax(1) / 7.5).half())
    corrected = E - lqer.correction(f)
    assert torch.linalg.matrix_norm(corrected) < torch.linalg.matrix_norm(E)


def test_per_row_fallback_when_b_does_not_fill_whole_groups():
    E = quantisation_error(50, 30)  # 4 x 30 = 120 elements: not a multiple of 64
    f = lqer.factorize(E, 4, asym=True, group=64, factor_bits=4)
    assert f["lqer_a_scale"].shape == (50,) and f["lqer_b_scale"].shape == (4,)
    for codes in (f["lqer_a"], f["lqer_b"]):
        assert int(codes.abs().max()) <= 7  # symmetric int4
    assert torch.linalg.matrix_norm(E - lqer.correction(f)) < torch.linalg.matrix_norm(E)
    sym = lqer.factorize(E, 4, asym=False)  # LQER_ASYM_ENABLED=0: the same per-row form
    assert torch.equal(sym["lqer_a"], f["lqer_a"])


def test_zero_error_gives_a_zero_correction():
    f = lqer.factorize(torch.zeros(16, 64), 4)
    assert not f["lqer_a"].any() and not lqer.correction(f).any()  # B holds unit singular vectors: any codes


def test_export_corrects_the_largest_errors_and_applies_them_at_load():
    torch.manual_seed(0)
    sd = {f"blocks.{i}.mlp.fc.weight": torch.randn(300, 256) * (1 + i) for i in range(3)}
    sd["tok_emb.weight"] = torch.randn(400, 256).bfloat16()
    hessians = {name: torch.eye(256) for name in sd}
    int6 = [n for n in sd if n != "tok_emb.weight"]
    cfg = Config(lqer_enabled=True, lqer_top_k=2, embed_bits=5)
    payload, report = export.quantize_state_dict_gptq(sd, fp32_names=(), int6_names=int6, hessians=hessians, cfg=cfg)
    plain, _ = export.quantize_state_dict_gptq(sd, fp32_names=(), int6_names=int6, hessians=hessians,
                                            cfg=dataclasses.replace(cfg, lqer_enabled=False))
    errors = {}
    for name, entry in plain["tensors"].items():
        errors[name] = float(torch.linalg.matrix_norm(sd[name].float() - entry["q"].float() * entry["scale"].float()[:, None]))
    assert report["lqer"] == sorted(errors, key=errors.get, reverse=True)[:2]
    with_lqer, without = export.dequantize_state_dict(payload), export.dequantize_state_dict(plain)
    for name in sd:
        assert ("lqer_a" in payload["tensors"][name]) == (name in report["lqer"])
        err_with = torch.linalg.matrix_norm(sd[name].float() - with_lqer[name].float())
        err_without = torch.linalg.matrix_norm(sd[name].float() - without[name].float())
        assert (err_with < err_without) if name in report["lqer"] else torch.equal(with_lqer[name], without[name])
    assert with_lqer["tok_emb.weight"].dtype == torch.bfloat16
