"""Every kernel variant compiles to sm_90a on this (GPU-less) machine, without spills,
with 16-byte state accesses where the layout allows them."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from compile_variants import variants

VARIANTS = variants()
# The decode family's layout rules (one state store a token or step, the L2 prefetch) do not
# apply to the spec ring's kernels, which have their own tests below.
DECODE = [name for name, cfg in VARIANTS.items() if cfg.spec is None]
FOLDS = [name for name, cfg in VARIANTS.items() if cfg.spec == "fold"]
SPEC_MMA = [name for name, cfg in VARIANTS.items() if cfg.spec == "verify" and cfg.tensor_cores]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ptx_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx")
    subprocess.run([sys.executable, os.path.join(HERE, "compile_variants.py"), str(out)],
                   check=True, timeout=1800)
    return out


def ptxas() -> str:
    path = os.environ.get("PTXAS") or shutil.which("ptxas")
    if path is None:
        pytest.fail("ptxas (CUDA's assembler) is needed to read the register report: "
                    "put it on PATH or set PTXAS")
    return path


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_compiles_for_sm90a_without_local_memory(ptx_dir, name):
    report = subprocess.run([ptxas(), "-arch=sm_90a", "-v", str(ptx_dir / f"{name}.ptx"),
                             "-o", os.devnull], capture_output=True, text=True, check=True).stderr
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report


@pytest.mark.parametrize("name", DECODE)
def test_state_is_written_in_16_byte_vectors_when_aligned(ptx_dir, name):
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    stores = sum(ptx.count(f"st.global.{cs}v4.{t}") for t in ("f32", "b32") for cs in ("", "cs."))
    lanes_per_row = 4 if cfg.tensor_cores else 8
    per_copy = cfg.rows_per_thread * cfg.head_k_dim // (lanes_per_row * 16 // cfg.state_dtype.itemsize)
    # The last state to the pool (not with per-token slots), or every token's state.
    each_token = cfg.intermediate is not None or cfg.per_token_slots
    copies = int(cfg.update_state and not cfg.per_token_slots) + (cfg.tokens if each_token else 0)
    # ReplaySSM: a lane's chunk of the appended key is one 16-byte store in float32.
    # (At L = 1 every step flushes: nothing is appended.)
    ring_key = int(cfg.ring_len > 1 and cfg.ring_vectorized and cfg.ring_dtype == torch.float32)
    if cfg.flush_mma:  # the flush writes the accumulators' pairs (the next test)
        copies = 0
    assert stores == (per_copy * copies if cfg.state_vectorized else 0) + ring_key


@pytest.mark.parametrize("name", DECODE)
def test_streaming_rows_are_streaming_stores_and_nothing_else_is(ptx_dir, name):
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    streaming = cfg.streaming_rows
    per_copy = cfg.rows_per_thread * cfg.head_k_dim // (8 * 4)
    assert ptx.count("st.global.cs.v4.f32") == (per_copy * cfg.tokens if streaming else 0)
    assert ptx.count("st.global.cs.") == ptx.count("st.global.cs.v4.f32")


def test_a_kernel_streaming_its_rows_prefetches_1_mib_of_state_ahead_others_4():
    from gdn_backend.kernels.decode import GatedDeltaRuleDecode
    verify = dict(num_heads=2, num_v_heads=4, head_k_dim=128, head_v_dim=128, tokens=4,
                  state_bytes=4, rows_per_cta=16, rows_per_thread=1, intermediate="rows",
                  update_state=False)
    tile_bytes = 16 * 128 * 4
    assert GatedDeltaRuleDecode(**verify, streaming_rows=True).prefetch_ahead == (1 << 20) // tile_bytes
    assert GatedDeltaRuleDecode(**verify).prefetch_ahead == (4 << 20) // tile_bytes


@pytest.mark.parametrize("name", [n for n in DECODE if VARIANTS[n].flush_mma])
def test_the_tensor_core_flush_runs_one_mma_a_span_and_16_places_and_stores_each_pair_once(
        ptx_dir, name):
    """A warp's flush: per 8-column span of its share of the block's columns, one mma.sync
    per 16 ring places, unrolled; then each accumulator pair of its two rows stored once."""
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    warps, blocks = cfg.rows_per_cta // cfg.rows_per_thread * 8 // 32, cfg.rows_per_cta // 16
    spans = cfg.head_k_dim // 8 // (warps // blocks)
    k_steps = -(-cfg.ring_len // 16)
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == spans * k_steps
    if not cfg.state_vectorized:  # an unaligned pool: a pair is two element stores
        pair, stores = "b16" if cfg.state_dtype == torch.bfloat16 else "b32", 2
    else:
        pair, stores = "b32" if cfg.state_dtype == torch.bfloat16 else "v2.b32", 1
    assert ptx.count(f"st.global.{pair}") >= 2 * spans * stores


@pytest.mark.parametrize("name", [n for n in DECODE if VARIANTS[n].tensor_cores
                                  and VARIANTS[n].intermediate])
def test_the_tensor_core_verify_forms_each_state_in_its_own_mmas_from_the_loaded_state(
        ptx_dir, name):
    """Steps 1 and 2 once, then per token one rank-update MMA per 16 rows and 8 columns; the
    pool's new state (where written) is the last token's, not one pass more."""
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    R, K = cfg.rows_per_thread, cfg.head_k_dim
    products = K // 16 * (R + 2) + R // 2 * 4 * (K // 32) * cfg.tokens
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == products


PREFETCH = "cp.async.bulk.prefetch.L2.global"


@pytest.mark.parametrize("name", DECODE)
def test_state_prefetch_runs_ahead_of_the_wait_and_one_launch_at_most(ptx_dir, name):
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    if not cfg.use_pdl:
        assert "griddepcontrol" not in ptx
        return
    wait, trigger = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
    assert wait < trigger  # the next launch may start only once this one has passed its wait
    if cfg.state_vectorized and not cfg.per_token_slots:
        assert ptx.index("ld.global.cg") < ptx.index(PREFETCH) < wait
    else:  # per-token slots: the slot is two dependent reads away, no early prefetch
        assert PREFETCH not in ptx[:wait]


@pytest.mark.parametrize("name", DECODE)
def test_each_cta_prefetches_one_later_tile_once_the_indices_are_final(ptx_dir, name):
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    after_wait = ptx[ptx.index("griddepcontrol.wait"):] if cfg.use_pdl else ptx
    assert after_wait.count(PREFETCH) == (1 if cfg.state_vectorized else 0)


@pytest.mark.parametrize("name", FOLDS)
def test_the_fold_writes_states_in_16_byte_vectors(ptx_dir, name):
    """The folded checkpoint, and with snapshots the track slot (on CUDA cores: before the
    records or after one of them): each a copy of the thread's rows in 16-byte stores where
    the pool allows them."""
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    stores = sum(ptx.count(f"st.global.{cs}v4.{t}") for t in ("f32", "b32") for cs in ("", "cs."))
    lanes_per_row = 4 if cfg.tensor_cores else 8
    per_copy = cfg.rows_per_thread * cfg.head_k_dim // (lanes_per_row * 16 // cfg.state_dtype.itemsize)
    # The CUDA-core fold stores a snapshot in two places, the tensor-core one (closed form) in one.
    snapshots = (1 if cfg.tensor_cores else 2) if cfg.track else 0
    assert stores == (per_copy * (1 + snapshots) if cfg.state_vectorized else 0)


@pytest.mark.parametrize("name", SPEC_MMA)
def test_the_tensor_core_verify_runs_its_products_on_mma_and_reads_its_rows_whole(ptx_dir, name):
    """Every product of the tensor-core spec verify is an mma.sync, none in a loop: the
    records' key products (K split over the warps), S0 x (an fp32 checkpoint's high and low
    parts), the Gram matrix and the records' d; and the checkpoint rows are read whole."""
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    R, K = cfg.rows_per_thread, cfg.head_k_dim
    warps, k_blocks, record_blocks = cfg.rows_per_cta // (8 * R), K // 16, -(-cfg.ring_len // 16)
    parts = 2 if cfg.state_dtype == torch.float32 else 1
    products = (record_blocks * 2 * (k_blocks // warps) * 2 + k_blocks * (R * parts + 2)
                + R * record_blocks * 2)
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == products
    assert_rows_read_whole(cfg, ptx)


@pytest.mark.parametrize("name", [n for n in FOLDS if VARIANTS[n].tensor_cores])
def test_the_tensor_core_fold_reads_its_rows_whole(ptx_dir, name):
    cfg = VARIANTS[name]
    assert_rows_read_whole(cfg, (ptx_dir / f"{name}.ptx").read_text())


def assert_rows_read_whole(cfg, ptx: str) -> None:
    """Where the pool is 16-byte aligned, the CTA's checkpoint rows are read 16 bytes at a
    time: staged into shared memory by cp.async or loaded into registers, as the
    configuration places them (the dispatch stages bf16 rows from 1024 heads, never fp32 ones)."""
    threads = cfg.rows_per_cta // cfg.rows_per_thread * 4
    vectors = cfg.rows_per_cta * cfg.head_k_dim * cfg.state_dtype.itemsize // 16 // threads
    staged = cfg.staged_rows
    if not cfg.state_vectorized:
        vectors = 0
    assert ptx.count("cp.async.cg.shared.global") == (vectors if staged else 0)
    assert ptx.count("ld.global.v4.b32") == (0 if staged else vectors)


@pytest.mark.parametrize("name", [n for n in FOLDS if VARIANTS[n].tensor_cores])
def test_the_tensor_core_fold_updates_each_state_in_one_mma_per_four_records(ptx_dir, name):
    """Per 16 rows and 8 columns of a warp, one mma.sync per four ring places, for the folded
    checkpoint and again for a snapshot."""
    cfg = VARIANTS[name]
    ptx = (ptx_dir / f"{name}.ptx").read_text()
    tiles = cfg.rows_per_thread // 2 * cfg.head_k_dim // 8
    products = tiles * -(-cfg.ring_len // 4) * (2 if cfg.track else 1)
    assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == products
