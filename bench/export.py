"""Artifact bytes and seconds per compressor, on the same quantised weights (issue 16).

    python -m bench.export [--smoke] [--preset NAME] [--name value ...]
    python -m bench.export --checkpoint runs/<id>/checkpoint.pt [--name value ...]

The weights are the configured model's at initialisation (the seed's parity weights with the
default config; --preset frontier for the frontier's), or a trained model's: --checkpoint takes
the checkpoint.pt a run leaves (`python train.py --preset smoke` writes one in minutes on a CPU;
its config is the checkpoint's, then the settings given), quantised once with the config's QUANT
(GPTQ's Hessians then come from GPTQ_CALIBRATION_BATCHES batches of random tokens: the table
measures the compressors, not calibration). Each compressor then codes that same payload:
zstd at ZSTD_LEVEL, brotli (q11, window 2^24), and the per-group container with each group coder
(lrzip only where the program is on PATH). Encode is the whole write (for pergroup: the L1 sort
included); decode is bytes -> state dict. Runs on the CPU (the sort and GPTQ use the GPU when
there is one); --smoke: the tiny bench.common.SMOKE_ARGS model, seconds.
"""
import sys
import time

import torch

from bench.common import bench_config, build_model, describe, header, table
from model import compressors, export, gptq

CALIBRATION_ROWS = 1  # sequences per random calibration batch


def quantised_payload(cfg, model) -> tuple[dict, dict, float]:
    """(payload, report, seconds) of the model's weights under cfg.quant."""
    sd = model.state_dict()
    fp32, int6 = model.control_tensor_names(), model.int6_matrix_names()
    t0 = time.perf_counter()
    if cfg.quant == "int6":
        payload, report = export.quantize_state_dict(sd, fp32_names=fp32, int6_names=int6)
        return payload, report, time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (CALIBRATION_ROWS, cfg.train_seq_len), generator=g).to(device)
               for _ in range(cfg.gptq_calibration_batches)]
    names = export.gptq_names(sd, fp32_names=fp32)
    hessians, _ = gptq.collect_hessians(model, batches, names)
    gate_names = model.int8_row_matrix_names() if hasattr(model, "int8_row_matrix_names") else ()
    payload, report = export.quantize_state_dict_gptq(
        {k: v.cpu() for k, v in model.state_dict().items()}, fp32_names=fp32, int6_names=int6, hessians=hessians,
        gate_names=gate_names, cfg=cfg)
    return payload, report, time.perf_counter() - t0


def variants() -> list[tuple[str, str, str]]:
    """(label, compressor, group coder) of every measured way."""
    out = [("zstd", "zstd", ""), ("brotli", "brotli", ""), ("pergroup+brotli", "pergroup", "brotli"),
           ("pergroup+zstd", "pergroup", "zstd")]
    if compressors.lrzip_available():
        out.append(("pergroup+lrzip", "pergroup", "lrzip"))
    return out


def measure(payload: dict, level: int) -> list[dict]:
    import io

    rows, zstd_bytes = [], None
    for label, compressor, coder in variants():
        out = io.BytesIO()
        t0 = time.perf_counter()
        export._encode_into(payload, out, compressor=compressor, level=level, group_coder=coder or "brotli")
        encode_s = time.perf_counter() - t0
        blob = out.getvalue()
        t0 = time.perf_counter()
        export.artifact_from_bytes(blob)
        decode_s = time.perf_counter() - t0
        zstd_bytes = zstd_bytes or len(blob)
        rows.append({"compressor": label, "bytes": f"{len(blob):,}", "vs zstd": f"{len(blob) - zstd_bytes:+,}",
                     "encode s": encode_s, "decode s": decode_s})
    return rows


SMOKE_VOCAB = ["--vocab_size", "1400"]  # 1400 x 48 > 65,536: the smoke's embedding is quantised and its group sorted


def checkpoint_weights(argv: list[str]) -> tuple[list[str], dict | None]:
    """(argv without --checkpoint PATH, the checkpoint's state or None); its config's fields go
    in front of the remaining settings, so those still win."""
    if "--checkpoint" not in argv:
        return argv, None
    i = argv.index("--checkpoint")
    if i + 1 >= len(argv):
        raise SystemExit("bench.export: --checkpoint needs a path: --checkpoint runs/<id>/checkpoint.pt")
    from model.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(argv[i + 1], required_keys=("config", "model"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.export: {e}") from None
    settings = [item for key, value in state["config"].items() if key not in ("run_id", "resume", "eval_only")
                for item in (f"--{key}", str(int(value)) if isinstance(value, bool) else str(value))]
    return settings + argv[:i] + argv[i + 2 :], state


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, state = checkpoint_weights(argv)
    if "--smoke" in argv:  # after SMOKE_ARGS, before the caller's settings (which still win)
        argv = ["--smoke", *SMOKE_VOCAB, *(a for a in argv if a != "--smoke")]
    cfg, smoke = bench_config("bench.export", argv)
    with torch.no_grad():  # not torch.set_grad_enabled(False): main() is also called in-process (by tests)
        model = build_model(cfg)
        if state is not None:
            model.load_state_dict(state["model"])
        payload, report, quant_s = quantised_payload(cfg, model)
    print(header("Artifact compressors on one quantised payload"))
    origin = "trained (checkpoint)" if state is not None else f"at initialisation (seed {cfg.seed})"
    print(f"Weights: {describe(cfg)}, {origin}; QUANT={cfg.quant} in {quant_s:.1f}s, "
          f"{report['total']['bytes_after']:,} bytes before compression.")
    if smoke:
        print("\nSMOKE RUN (--smoke): tiny model; the figures mean nothing.\n")
    rows = measure(payload, cfg.zstd_level)
    print(table(rows))
    if not compressors.lrzip_available():
        print("\npergroup+lrzip: not measured, lrzip is not on PATH.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
