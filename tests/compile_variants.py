"""Compile every kernel variant for sm_90a on this machine (no GPU needed) and keep its PTX.

    python tests/compile_variants.py OUT_DIR [NAME ...]

Writes OUT_DIR/<name>.ptx for each variant of `variants()` (or the named ones). Runs in
its own process because cutlass-dsl reads its CUTE_DSL_* settings once, at import.
"""

import os
import shutil
import sys
import tempfile
from dataclasses import replace

import torch


def variants() -> dict:
    from gdn_backend.kernels.compile import KernelConfig
    from gdn_backend.kernels.heuristics import (LARGE, RING_WIDE, SPEC_MMA, SPEC_MMA_SMALL,
                                                TILES, ring_tiles_for, spec_stages_rows,
                                                spec_tiles_for, tiles_for)

    out = {}
    for state in (torch.float32, torch.bfloat16):
        s = "f32" if state == torch.float32 else "bf16"
        base = KernelConfig(
            num_heads=16, num_v_heads=32, head_k_dim=128, head_v_dim=128, tokens=1,
            qkv_dtype=torch.bfloat16, gate_dtype=torch.bfloat16, A_log_dtype=torch.float32,
            dt_bias_dtype=torch.bfloat16,
            state_dtype=state, index_dtype=torch.int32, rows_per_cta=32, rows_per_thread=2)
        for tile in TILES:
            for T in (1, 2, 4, 8):
                if not any(tile in tiles_for(hv, 128, T, state.itemsize) for hv in (4, 32)):
                    continue  # the heuristic never launches this one
                kind = "mma" if tile.tensor_cores else "tile"
                out[f"{s}_{kind}{tile.rows_per_cta}x{tile.rows_per_thread}_T{T}"] = replace(
                    base, tokens=T, rows_per_cta=tile.rows_per_cta,
                    rows_per_thread=tile.rows_per_thread, tensor_cores=tile.tensor_cores)
        if state == torch.bfloat16:
            # The tensor-core kernel at every T it takes, and without 16-byte access.
            for T in (1, 2, 3):
                out[f"bf16_mma64x2_T{T}"] = replace(base, tokens=T, rows_per_cta=64,
                                                    tensor_cores=True)
            out["bf16_mma64x2_unaligned"] = replace(
                base, tokens=4, rows_per_cta=64, tensor_cores=True, qkv_vectorized=False,
                state_vectorized=False)
            # Writing every intermediate state (SGLang's verify, vLLM's with the pool too):
            # dispatched for TP8's bf16 verify where it won (heuristics.py).
            for T in (1, 2, 3, 4):
                out[f"bf16_mma64x2_verify_rows_T{T}"] = replace(
                    base, tokens=T, rows_per_cta=64, tensor_cores=True, intermediate="rows",
                    update_state=False)
            out["bf16_mma32x2_verify_indexed_T4_updated"] = replace(
                base, tokens=4, tensor_cores=True, intermediate="indexed",
                inter_index_dtype=torch.int64)
        for T in (2, 8):
            out[f"{s}_verify_rows_T{T}"] = replace(base, tokens=T, intermediate="rows",
                                                   update_state=False)
            out[f"{s}_verify_indexed_T{T}"] = replace(
                base, tokens=T, intermediate="indexed", inter_index_dtype=torch.int64,
                update_state=False)
        if state == torch.float32:
            # Verify at TP8, T = 4: 4 rows a thread up to 128 heads, 16-row tiles to 512,
            # streaming rows from 256 (and TP1's 32 x 2 tiles from 256 heads, ragged rows too).
            tp8 = replace(base, num_heads=2, num_v_heads=4, tokens=4, intermediate="rows",
                          update_state=False)
            out["f32_verify_rows32x4_T4_tp8"] = replace(tp8, rows_per_thread=4)
            out["f32_verify_rows16x1_T4_tp8_streaming"] = replace(
                tp8, rows_per_cta=16, rows_per_thread=1, streaming_rows=True)
            # ... and at T = 8: 16 x 2 up to 64 heads, streaming rows from 128.
            out["f32_verify_rows16x2_T8_tp8"] = replace(tp8, tokens=8, rows_per_cta=16,
                                                        rows_per_thread=2)
            out["f32_verify_rows8x1_T8_tp8_streaming"] = replace(
                tp8, tokens=8, rows_per_cta=8, rows_per_thread=1, streaming_rows=True)
            out["f32_verify_rows_T4_streaming"] = replace(
                base, tokens=4, intermediate="rows", update_state=False, streaming_rows=True)
            out["f32_ragged_verify_T4_streaming"] = replace(
                base, tokens=4, ragged=True, intermediate="indexed",
                inter_index_dtype=torch.int32, update_state=False, streaming_rows=True)
        out[f"{s}_slots8x1_T2"] = replace(base, tokens=2, per_token_slots=True, rows_per_cta=8,
                                          rows_per_thread=1)
        for T in (2, 4):
            out[f"{s}_slots_T{T}"] = replace(base, tokens=T, per_token_slots=True)
            out[f"{s}_ragged_verify_T{T}"] = replace(
                base, tokens=T, ragged=True, intermediate="indexed",
                inter_index_dtype=torch.int32, update_state=False)
        out[f"{s}_ragged_decode_T2"] = replace(base, tokens=2, ragged=True)
        out[f"{s}_ragged_slots_T4_int64"] = replace(base, tokens=4, ragged=True,
                                                    per_token_slots=True, index_dtype=torch.int64)
        out[f"{s}_tp8_fp16_fp32gates_int64"] = replace(
            base, num_heads=2, num_v_heads=4, qkv_dtype=torch.float16, gate_dtype=torch.float32,
            A_log_dtype=torch.bfloat16, dt_bias_dtype=torch.float32,
            index_dtype=torch.int64)
        out[f"{s}_fp32_qkv"] = replace(base, qkv_dtype=torch.float32, gate_dtype=torch.float32)
        out[f"{s}_unaligned"] = replace(base, tokens=2, qkv_vectorized=False, state_vectorized=False)
        out[f"{s}_no_pdl"] = replace(base, use_pdl=False)
        # ReplaySSM decode at each tile T = 1 takes, with either form of the flush at the
        # 32- and 64-row ones (the dispatch's and the sweep's), SGLang's ring of 16, and odd
        # rings.
        ring_tiles = [t for hv in (4, 32) for t in ring_tiles_for(hv, 128, s == "bf16")]
        ring_tiles += [replace(t, flush_mma=on) for t in (LARGE, RING_WIDE)
                       for on in (False, s == "bf16")]
        for tile in dict.fromkeys(replace(t, flush_mma=bool(t.flush_mma)) for t in ring_tiles):
            name = f"{s}_replayssm{tile.rows_per_cta}x{tile.rows_per_thread}"
            out[name + ("_mma_flush" if tile.flush_mma else "")] = replace(
                base, rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                ring_len=16, ring_dtype=state, force_flush=True, flush_mma=tile.flush_mma)
        # Odd rings (bf16: on the tensor-core flush, whose K pads to 16 and 32 places).
        bf16_flush = s == "bf16"
        out[f"{s}_replayssm_L1"] = replace(base, ring_len=1, ring_dtype=state,
                                           flush_mma=bf16_flush)
        out[f"{s}_replayssm_L32_unaligned"] = replace(
            base, ring_len=32, ring_dtype=state, ring_vectorized=False, state_vectorized=False,
            flush_mma=bf16_flush)
        if state == torch.float32:  # bf16 records beside fp32 checkpoints
            out["f32_replayssm64x4_bf16_rings_mma_flush"] = replace(
                base, rows_per_cta=64, rows_per_thread=4, ring_len=16,
                ring_dtype=torch.bfloat16, flush_mma=True)
        # The spec ring (bf16 records, int64 request rows): the verify at each window and
        # tile, the fold with and without snapshots, the cursor reset.
        spec = replace(base, ring_len=16, ring_dtype=torch.bfloat16,
                       row_index_dtype=torch.int64)
        # The tensor-core kernels with their checkpoint rows where the dispatch puts them at
        # large batches.
        spec_mma = replace(spec, tensor_cores=True,
                           staged_rows=spec_stages_rows(state.itemsize, heads=4096))
        for tile in dict.fromkeys(t for hv in (4, 32)
                                  for t in spec_tiles_for(hv, 128, state.itemsize)):
            for T in (2, 3, 4, 8):
                out[f"{s}_spec_verify{tile.rows_per_cta}x{tile.rows_per_thread}_T{T}"] = replace(
                    spec, tokens=T, rows_per_cta=tile.rows_per_cta,
                    rows_per_thread=tile.rows_per_thread, spec="verify", ragged=True,
                    update_state=False)
            for track in (False, True):
                name = f"{s}_spec_fold{tile.rows_per_cta}x{tile.rows_per_thread}"
                out[name + ("_track" if track else "")] = replace(
                    spec, rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                    spec="fold", track=track)
        # The tensor-core verify at its tiles, every window it serves, and at a whole head a
        # CTA, rings of 32.
        for tile in (SPEC_MMA_SMALL, SPEC_MMA):
            for T in (1, 2, 3, 4):
                out[f"{s}_spec_verify_mma{tile.rows_per_cta}x{tile.rows_per_thread}_T{T}"] = replace(
                    spec_mma, tokens=T, rows_per_cta=tile.rows_per_cta,
                    rows_per_thread=tile.rows_per_thread, spec="verify",
                    ragged=True, update_state=False)
        for tile in (SPEC_MMA_SMALL, SPEC_MMA):
            for track in (False, True):
                name = f"{s}_spec_fold_mma{tile.rows_per_cta}x{tile.rows_per_thread}"
                out[name + ("_track" if track else "")] = replace(
                    spec_mma, rows_per_cta=tile.rows_per_cta, rows_per_thread=tile.rows_per_thread,
                    spec="fold", track=track)
        out[f"{s}_spec_fold_mma_L32_unaligned"] = replace(
            spec_mma, rows_per_cta=64, rows_per_thread=2, spec="fold",
            track=True, ring_len=32, ring_vectorized=False, state_vectorized=False)
        out[f"{s}_spec_verify_mma128x2_L32"] = replace(
            spec_mma, tokens=4, rows_per_cta=128, rows_per_thread=2,
            spec="verify", ragged=True, update_state=False, ring_len=32)
        out[f"{s}_spec_verify_mma_unaligned"] = replace(
            spec_mma, tokens=4, rows_per_cta=64, rows_per_thread=2,
            spec="verify", ragged=True, update_state=False, row_index_dtype=torch.int32,
            ring_vectorized=False, state_vectorized=False)
        # ... and with the other placement of the rows, which small bf16 batches and forced
        # tiles take.
        other = replace(spec_mma, staged_rows=not spec_mma.staged_rows, rows_per_cta=64,
                        rows_per_thread=2)
        rows = "registers" if spec_mma.staged_rows else "staged"
        out[f"{s}_spec_verify_mma64x2_T4_{rows}"] = replace(
            other, tokens=4, spec="verify", ragged=True, update_state=False)
        out[f"{s}_spec_fold_mma64x2_{rows}"] = replace(other, spec="fold")
        out[f"{s}_spec_verify_int32_rows_unaligned"] = replace(
            spec, tokens=4, spec="verify", ragged=True, update_state=False,
            row_index_dtype=torch.int32, ring_vectorized=False, state_vectorized=False)
    out["spec_finish"] = replace(spec, spec="finish", rows_per_cta=8, rows_per_thread=1)
    out["spec_finish_track"] = replace(out["spec_finish"], track=True)
    return out


def main() -> None:
    out_dir = os.path.abspath(sys.argv[1])
    os.makedirs(out_dir, exist_ok=True)
    dump = tempfile.mkdtemp(prefix="gdn_ptx_")
    os.environ.update(CUTE_DSL_ARCH="sm_90a", CUTE_DSL_DUMP_DIR=dump, CUTE_DSL_KEEP="ptx,cubin",
                      CUTE_DSL_NO_CACHE="1", CUTE_DSL_KEEP_PTX="1", CUTE_DSL_KEEP_CUBIN="1",
                      CUTE_DSL_DISABLE_FILE_CACHING="1")
    from gdn_backend.kernels.compile import build

    chosen = variants()
    if len(sys.argv) > 2:
        chosen = {name: chosen[name] for name in sys.argv[2:]}
    for name, cfg in chosen.items():
        try:
            build(cfg)
        except Exception as e:  # cutlass-dsl 4.3.5 raises at module load without a driver
            if "cuInit" not in f"{e} {e.__cause__}" and "CUDA Driver" not in f"{e} {e.__cause__}":
                raise
        ptx = [f for f in os.listdir(dump) if f.endswith(".ptx")]
        assert len(ptx) == 1, f"{name}: expected one PTX file, found {ptx}"
        with open(os.path.join(dump, ptx[0]), "rb") as f:
            text = f.read().rstrip(b"\0")
        with open(os.path.join(out_dir, f"{name}.ptx"), "wb") as f:
            f.write(text)
        for f in os.listdir(dump):
            os.remove(os.path.join(dump, f))
        print(f"compiled {name}", flush=True)
    shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
    main()
