"""The benchmark, SPEC.md's method: python -m gdn_backend.bench [--modes ...] [--json PATH]

Every cell (cells.py: a mode, a shape, a pool dtype, B and T) is timed under CUDA-graph
replay with a cold L2: one graph holds `sets` launches back to back, each on a disjoint set
of scattered slots, at least 256 MiB of state in all, so no slot is still cached when it is
read again. The time of a cell is the median replay over the launches in it. Beside every
cell the same graph method times a plain device copy of the bytes that cell's mode must
move (one state read, one written for each state it keeps): the floor a step is held
against; ReplaySSM cells are held against the classic decode step's bytes, and time beside
them a copy of their own bytes and the classic step, ours and SGLang's. The copy ceiling (the best of 256 MiB to 1 GiB device copies) is measured once.

Peers, in the same process, where they import and serve the mode (each its own module):
SGLang's own Triton kernels, on the pool in place, called as SGLang calls them (sglang.py
says how to run them where SGLang is not installed); vLLM's MTP-verify kernel on the
per-token slots (vllm.py, likewise); FlashInfer's pooled GDN kernels
(flashinfer.py); for decode, a plain PyTorch gather -> step -> scatter and
flash-linear-attention's fused_recurrent_gated_delta_rule with gather/scatter, both given
the valid rows only (neither handles padding in place).

--tiles 32x4 32x2 ... also times every cell with each given tile (rows per CTA x rows per
thread; "tc" after it: the tensor-core kernels, "tcs" / "tcr": the spec ring's with their
checkpoint rows staged / in registers) in place of the dispatch's choice: the sweep behind
the dispatch rules.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..kernels.heuristics import ring_serves, serves
from ..op import warmup
from ..replayssm import warmup_replayssm
from ..replayssm_spec import warmup_replayssm_spec
from . import fla, flashinfer, sglang, spec_ring, torch_step, vllm
from .cells import MODES, POOLS, RING, SHAPES, Cell
from .plot import plot
from .tiles import forced_tile, parse_tile, tile_name
from .timing import copy_ceiling_tbps, settle, time_graph

BATCHES = (1, 4, 16, 32, 64, 128, 256)
TOKENS = {"decode": (1, 2, 4), "verify": (2, 3, 4, 8), "slots": (2, 3, 4, 8),
          "ragged": (2, 3, 4, 8), "replayssm": (1,), "spec": (4,)}
# Peers by the key of their time in a row. Gather/scatter peers allocate inside the graph,
# so they replay fewer sets.
PEERS = {"sglang_us": sglang, "vllm_us": vllm, "flashinfer_us": flashinfer,
         "torch_us": torch_step, "fla_us": fla}
GATHER_CALLS = 256


def run(modes, shapes, pools, batches, tokens, replays: int, peers: bool, tiles=()) -> dict:
    """Time every cell; `tokens` None takes each mode's own T (TOKENS)."""
    ceiling = copy_ceiling_tbps()
    print(f"copy ceiling: {ceiling:.2f} TB/s (best large device copy, read + write)", flush=True)
    present = {key: peer for key, peer in PEERS.items() if peers and peer.available()}
    rows = []
    print(header(present))
    for mode in modes:
        for shape in shapes:
            for pool in pools:
                for T in tokens or TOKENS[mode]:
                    for B in batches:
                        if mode == "spec":
                            rows.append(spec_row(shape, pool, B, T, B == batches[0], present,
                                                 replays, ceiling, tiles))
                            continue
                        cell = Cell(mode, shape, pool, B, T)
                        if B == batches[0]:
                            warmup(device="cuda", num_heads=cell.H, num_v_heads=cell.HV,
                                   state_dtype=POOLS[pool], dt_bias_dtype=torch.float32,
                                   tokens=(T,), **cell.warmup_options)
                            if mode == "replayssm":
                                warmup_replayssm(device="cuda", num_heads=cell.H,
                                                 num_v_heads=cell.HV, ring_len=RING,
                                                 state_dtype=POOLS[pool],
                                                 dt_bias_dtype=torch.float32)
                        row = time_cell(cell, present, replays, tiles)
                        row["pct_ceiling"] = 100 * row["tbps"] / ceiling
                        rows.append(row)
                        print(format_row(row, present), flush=True)
                        del cell
                        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_ceiling_tbps": ceiling,
            "peers": {key: peer.version() for key, peer in present.items()},
            "method": "CUDA-graph replay, cold L2 (>= 256 MiB of disjoint slot sets per replay), "
                      "median of replays; copy = device copy of the bytes the mode moves, same "
                      "method",
            "rows": rows}


def spec_row(shape: str, pool: str, B: int, T: int, first: bool, peers: dict, replays: int,
             ceiling: float, tiles=()) -> dict:
    """One spec-ring cell (spec_ring.py), printed; SGLang's step needs its exported kernels
    (its cursor advance runs on both sides)."""
    if "sglang_us" not in peers:
        raise SystemExit("--modes spec needs SGLang's kernels (bench/sglang.py): the cursor "
                         "advance both sides run is SGLang's")
    cell = spec_ring.SpecCell(shape, pool, B, T)
    if first:
        warmup(device="cuda", num_heads=cell.H, num_v_heads=cell.HV, state_dtype=POOLS[pool],
               dt_bias_dtype=torch.float32, tokens=(T,), intermediate=True)
        warmup_replayssm_spec(device="cuda", num_heads=cell.H, num_v_heads=cell.HV,
                              max_tokens=T, ring_len=spec_ring.RING, state_dtype=POOLS[pool],
                              dt_bias_dtype=torch.float32)
    row = spec_ring.time_cell(cell, replays, tiles)
    row["pct_ceiling"] = 100 * row["tbps"] / ceiling
    print(format_row(row, peers), flush=True)
    del cell
    torch.cuda.empty_cache()
    return row


def time_cell(cell: Cell, peers: dict, replays: int, tiles=()) -> dict:
    settle(cell.ours, cell.sets)
    ours = time_graph(cell.ours, cell.sets, replays)
    copy = time_graph(cell.copy_of(cell.copy_bytes), cell.sets, replays)
    row = dict(mode=cell.mode, shape=cell.shape, pool=cell.pool_name, T=cell.T, B=cell.B,
               valid=cell.valid, bytes=cell.bytes, sets=cell.sets, ours_us=ours, copy_us=copy,
               ratio=ours / copy, tbps=cell.bytes / (ours * 1e-6) / 1e12)
    if cell.mode == "replayssm":
        # Beside it: a copy of the bytes it moves itself, and the classic step, ours and SGLang's.
        row["own_copy_us"] = time_graph(cell.copy_of(cell.bytes), cell.sets, replays)
        row["classic_us"] = time_graph(cell.classic, cell.sets, replays)
        if "sglang_us" in peers:
            row["sglang_classic_us"] = time_graph(sglang.packed_decode(cell), cell.sets, replays)
    for tile in tiles:
        if cell.mode == "replayssm" and not ring_serves(tile, cell.pool.dtype == torch.bfloat16):
            continue
        if serves(tile, cell.T, cell.pool.element_size(), cell.mode == "slots",
                  cell.mode == "ragged"):
            with forced_tile(tile):
                row.setdefault("tile_us", {})[tile_name(tile)] = time_graph(
                    cell.ours, cell.sets, replays)
    for key, peer in peers.items():
        if not peer.serves(cell):
            continue
        calls = cell.sets if peer.IN_PLACE else min(cell.sets, GATHER_CALLS)
        try:
            row[key] = time_graph(peer.step(cell), calls, replays)
        except Exception as e:  # a peer's own limit: record it, do not hide the cell
            row.setdefault("peer_errors", {})[key] = f"{type(e).__name__}: {e}"[:300]
    return row


def header(peers: dict) -> str:
    names = "".join(f" | {key.removesuffix('_us'):>10} {'ratio':>6}" for key in peers)
    return (f"{'mode':6} {'shape':5} {'pool':4} {'T':>1} {'B':>4} | {'ours µs':>8} "
            f"{'copy µs':>8} {'ratio':>6} {'TB/s':>5} {'%ceil':>5}{names}")


def format_row(r: dict, peers=PEERS) -> str:
    def peer(key):
        if key not in r:
            return f" | {'-':>10} {'-':>6}"
        return f" | {r[key]:10.2f} {r[key] / r['copy_us']:5.2f}x"
    tiles = "".join(f" | {name} {us / r['copy_us']:5.2f}x" for name, us in r.get("tile_us", {}).items())
    tiles += "".join(f" | {key.removesuffix('_us')} {r[key] / r['copy_us']:5.2f}x"
                     for key in ("own_copy_us", "classic_us", "sglang_classic_us",
                                 "spec_verify_us", "sglang_verify_us", "baseline_us") if key in r)
    return (f"{r.get('mode', 'decode'):6} {r['shape']:5} {r['pool']:4} {r['T']:>1} {r['B']:>4} | "
            f"{r['ours_us']:8.2f} {r['copy_us']:8.2f} {r['ratio']:5.2f}x {r['tbps']:5.2f} "
            f"{r['pct_ceiling']:5.1f}{''.join(peer(key) for key in peers)}{tiles}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["decode"], choices=MODES)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--tokens", nargs="+", type=int, default=None,
                        help="T of every cell (default: each mode's own, " + ", ".join(
                            f"{m} {' '.join(map(str, t))}" for m, t in TOKENS.items()) + ")")
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--tiles", nargs="+", type=parse_tile, default=[], metavar="RxT",
                        help="also time every cell with each of these tiles, e.g. 32x4 32x2 8x1")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw the ratios to the copy into this PNG (matplotlib)")
    parser.add_argument("--plot-from", help="no run: plot a JSON an earlier run wrote")
    args = parser.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), args.plot or args.plot_from.removesuffix(".json") + ".png")
        return
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU")
    result = run(args.modes, args.shapes, args.pools, args.batches, args.tokens, args.replays,
                 args.peers, args.tiles)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)

