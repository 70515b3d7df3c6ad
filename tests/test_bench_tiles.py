"""The benchmark's tile sweep (--tiles): what a tile is, and that a forced tile reaches the kernel."""

import argparse

import pytest
import torch

from gdn_backend.bench import runner, tiles
from gdn_backend.kernels import launch
from gdn_backend.kernels.heuristics import Tile, choose_tile
from gdn_backend.testing import make_problem
from gdn_backend.validation import validate


def test_a_tile_is_rows_per_cta_by_rows_per_thread():
    assert tiles.parse_tile("32x4") == Tile(rows_per_cta=32, rows_per_thread=4)
    assert tiles.parse_tile("8x1") == Tile(rows_per_cta=8, rows_per_thread=1)
    assert tiles.tile_name(Tile(rows_per_cta=64, rows_per_thread=2)) == "64x2"


def test_a_tensor_core_tile_ends_in_tc():
    assert tiles.parse_tile("64x2tc") == Tile(rows_per_cta=64, rows_per_thread=2, tensor_cores=True)
    assert tiles.parse_tile("64x2tcs") == Tile(64, 2, tensor_cores=True, staged_rows=True)
    assert tiles.parse_tile("64x2tcr") == Tile(64, 2, tensor_cores=True, staged_rows=False)
    assert tiles.tile_name(tiles.parse_tile("32x2tcr")) == "32x2tcr"
    assert tiles.tile_name(Tile(rows_per_cta=32, rows_per_thread=2, tensor_cores=True)) == "32x2tc"
    assert Tile(rows_per_cta=64, rows_per_thread=2, tensor_cores=True).threads == 128


def test_a_replayssm_tile_ending_in_m_or_c_flushes_on_tensor_or_cuda_cores():
    assert tiles.parse_tile("64x4m") == Tile(64, 4, flush_mma=True)
    assert tiles.parse_tile("32x2c") == Tile(32, 2, flush_mma=False)
    assert tiles.tile_name(tiles.parse_tile("64x4m")) == "64x4m"
    assert tiles.tile_name(tiles.parse_tile("64x4c")) == "64x4c"


@pytest.mark.parametrize("text", ["32", "32x", "x4", "48x1", "256x4", "32x3", "8x8", "0x1",
                                  "8x2tc", "32x3tc", "16x4tc", "32x2t", "64x2tcm", "64x4mc"])
def test_a_tile_the_kernel_cannot_build_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="tile"):
        tiles.parse_tile(text)


def test_the_command_line_refuses_a_bad_tile_before_touching_a_gpu(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--tiles", "32x3"])
    assert "rows per thread must divide" in capsys.readouterr().err


def _config(p):
    out = torch.empty(p.v.shape, dtype=p.q.dtype)
    return launch.config_for(validate(*p.args, out, scale=1.0, min_valid_slot=0))


def test_a_forced_tile_reaches_the_kernel_configuration_and_is_undone_after():
    p = make_problem(64, 1, 16, 32, num_slots=128, device="cpu")
    dispatch = choose_tile(64, 32, 128, 1, p.state_pool.element_size())
    forced = Tile(rows_per_cta=64, rows_per_thread=4)
    assert forced != dispatch
    with tiles.forced_tile(forced):
        cfg = _config(p)
    assert (cfg.rows_per_cta, cfg.rows_per_thread) == (64, 4)
    cfg = _config(p)
    assert (cfg.rows_per_cta, cfg.rows_per_thread) == (dispatch.rows_per_cta, dispatch.rows_per_thread)


def _verify_config(batch, inter_offset=0):
    p = make_problem(batch, 4, 2, 4, num_slots=batch + 1, device="cpu")  # TP8, fp32 pool
    out = torch.empty(p.v.shape, dtype=p.q.dtype)
    inter = torch.empty(batch * 4 * 4 * 128 * 128 + inter_offset)[inter_offset:].view(
        batch, 4, 4, 128, 128)
    return launch.config_for(validate(*p.args, out, scale=1.0, min_valid_slot=0,
                                      intermediate_states=inter, update_state=False))


def test_an_fp32_verify_streams_its_rows_as_the_dispatch_says_under_a_forced_tile_too():
    assert _verify_config(64).streaming_rows and not _verify_config(32).streaming_rows
    with tiles.forced_tile(tiles.parse_tile("16x1")):
        cfg = _verify_config(64)
    assert (cfg.rows_per_cta, cfg.streaming_rows) == (16, True)


def test_unaligned_intermediate_rows_take_plain_stores():
    cfg = _verify_config(64, inter_offset=1)
    assert not cfg.state_vectorized and not cfg.streaming_rows


def ring_call(batch, state_dtype):
    from gdn_backend.testing import RingPool
    from gdn_backend.validation import validate_rings

    pool = RingPool(batch, 16, 32, state_dtype=state_dtype)
    q, k, v, a, b = pool.tokens(batch)
    call = validate(q, k, v, a, b, pool.A_log, pool.dt_bias, pool.checkpoint,
                    torch.arange(batch, dtype=torch.int32), torch.empty_like(v), scale=1.0,
                    min_valid_slot=0)
    return validate_rings(call, *pool.rings, torch.zeros(batch, dtype=torch.int32), None)


def test_a_forced_tile_reaches_the_replayssm_configuration_too():
    with tiles.forced_tile(Tile(rows_per_cta=16, rows_per_thread=2)):
        cfg = launch.replayssm_config(ring_call(4, torch.float32))
    assert (cfg.rows_per_cta, cfg.rows_per_thread, cfg.ring_len) == (16, 2, 16)


@pytest.mark.parametrize("state_dtype, flush_mma", [(torch.bfloat16, True),
                                                    (torch.float32, False)])
def test_a_replayssm_flush_form_follows_the_dispatch_unless_the_tile_names_one(
        state_dtype, flush_mma):
    rc = ring_call(64, state_dtype)  # 2048 heads
    assert launch.replayssm_config(rc).flush_mma is flush_mma
    with tiles.forced_tile(tiles.parse_tile("64x4")):
        assert launch.replayssm_config(rc).flush_mma is flush_mma
    named = ["64x4c"] + (["64x4m"] if flush_mma else [])
    for text in named:
        with tiles.forced_tile(tiles.parse_tile(text)):
            cfg = launch.replayssm_config(rc)
        assert (cfg.rows_per_cta, cfg.rows_per_thread, cfg.flush_mma) == (64, 4, text[-1] == "m")


def test_a_forced_tensor_core_flush_on_fp32_rings_is_refused():
    with tiles.forced_tile(tiles.parse_tile("64x4m")):
        with pytest.raises(ValueError, match="bf16 rings"):
            launch.replayssm_config(ring_call(64, torch.float32))


def test_each_swept_tile_is_printed_as_its_time_over_the_copy():
    row = dict(shape="TP1", pool="bf16", T=4, B=64, ours_us=50.0, copy_us=40.0, ratio=1.25,
               tbps=2.0, pct_ceiling=50.0, tile_us={"32x4": 48.0, "32x2": 60.0})
    assert runner.format_row(row).endswith("| 32x4  1.20x | 32x2  1.50x")


def test_a_replayssm_row_prints_its_own_copy_and_the_classic_steps_beside_it():
    row = dict(mode="replayssm", shape="TP1", pool="fp32", T=1, B=64, ours_us=30.0,
               copy_us=40.0, ratio=0.75, tbps=2.0, pct_ceiling=50.0, own_copy_us=24.0,
               classic_us=42.0, sglang_classic_us=44.0)
    assert runner.format_row(row).endswith(
        "| own_copy  0.60x | classic  1.05x | sglang_classic  1.10x")


def spec_calls(layers=1, state_dtype=torch.float32):
    """A validated spec verify and fold of two requests, T = 4."""
    from gdn_backend.replayssm_spec import _validate_fold, _validate_verify
    from gdn_backend.testing import SpecRing

    ring = SpecRing(8, 4, 16, 32, layers=layers, state_dtype=state_dtype)
    q, k, v, a, b, cu = ring.window([4, 4])
    two = torch.tensor([1, 2], dtype=torch.int32)
    vc = _validate_verify(q, k, v, a, b, ring.A_log, ring.dt_bias, ring.checkpoint[0],
                          *ring.rings(0), cu, two, two, *ring.cursors, torch.empty_like(v), 4,
                          1.0, 0)
    fc = _validate_fold(ring.checkpoint, *ring.rings(None), two, two, *ring.cursors, two,
                        None, None)
    return vc, fc


def test_a_forced_tile_reaches_the_spec_rings_verify_and_fold_configurations():
    vc, fc = spec_calls(layers=2)
    with tiles.forced_tile(Tile(rows_per_cta=16, rows_per_thread=1)):
        verify, (fold, _) = launch.spec_verify_config(vc), launch.spec_fold_configs(fc)
    for cfg in (verify, fold):
        assert (cfg.rows_per_cta, cfg.rows_per_thread) == (16, 1)
    # A tensor-core tile reaches both (the cursor reset has no tiles).
    with tiles.forced_tile(Tile(rows_per_cta=128, rows_per_thread=2, tensor_cores=True)):
        verify, (fold, finish) = launch.spec_verify_config(vc), launch.spec_fold_configs(fc)
    for cfg in (verify, fold):
        assert (cfg.rows_per_cta, cfg.rows_per_thread, cfg.tensor_cores) == (128, 2, True)
    assert not finish.tensor_cores


def test_a_spec_row_prints_its_verify_and_baseline_beside_it():
    row = dict(mode="spec", shape="TP1", pool="fp32", T=4, B=64, ours_us=60.0, copy_us=100.0,
               ratio=0.6, tbps=2.0, pct_ceiling=50.0, spec_verify_us=45.0, baseline_us=110.0)
    assert runner.format_row(row).endswith("| spec_verify  0.45x | baseline  1.10x")


@pytest.mark.parametrize("state_dtype, staged_rows, staged", [
    (torch.bfloat16, None, False), (torch.float32, None, False),
    (torch.bfloat16, False, False), (torch.float32, True, True)])
def test_the_spec_rings_tensor_core_kernels_place_rows_as_dispatched_unless_a_tile_says(
        state_dtype, staged_rows, staged):
    vc, fc = spec_calls(state_dtype=state_dtype)  # two requests: rows in registers
    with tiles.forced_tile(Tile(64, 2, tensor_cores=True, staged_rows=staged_rows)):
        verify, (fold, finish) = launch.spec_verify_config(vc), launch.spec_fold_configs(fc)
    assert verify.staged_rows == fold.staged_rows == staged
    assert not finish.staged_rows
