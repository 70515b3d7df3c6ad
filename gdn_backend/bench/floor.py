"""The floor of verify's byte mix: one state read and T states written, with none of the math.

A verify reads one state and writes T, where the copy it is held against reads and writes
(1 + T) / 2 each, so its ratio to that copy could be bound by the mix of reads and writes
rather than by the kernel. This pass measures that bound: a Triton program reads a block of
a request's state once and stores it T times into a [B, T, HV, V, K] buffer (SGLang's
intermediate layout), in plain or streaming (`.cs`) stores, over a few block sizes and warp
counts; the best is timed by the benchmark's graph method beside the copy, cold L2 both.

    python -m gdn_backend.bench.floor --shapes TP8 --tokens 2 3 4 8 --batches 16 32 64 128 \\
        --json floor.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton
import triton.language as tl

from .cells import COLD_BYTES, POOLS, SHAPES, copy_of
from .timing import time_graph

V = K = 128
BLOCKS, WARPS = (1024, 4096), (4, 8)


@triton.jit
def fanout(src, dst, state_elems: tl.constexpr, tokens: tl.constexpr, block: tl.constexpr,
           streaming: tl.constexpr):
    """Program i stores block i of the states `tokens` times; a block lies in one request's."""
    start = tl.program_id(0) * block
    request = start // state_elems
    offs = tl.arange(0, block)
    x = tl.load(src + start + offs)
    within = start - request * state_elems + offs
    for t in tl.static_range(tokens):
        row = dst + (request * tokens + t) * state_elems + within
        if streaming:
            tl.store(row, x, cache_modifier=".cs")
        else:
            tl.store(row, x)


def launch(src: torch.Tensor, dst: torch.Tensor, tokens: int, block: int, warps: int,
           streaming: bool) -> None:
    """src [B, HV, V, K] -> dst [B, tokens, HV, V, K], every token's row a copy of src's."""
    state_elems = src[0].numel()
    assert state_elems % block == 0 and dst.shape[:2] == (src.shape[0], tokens)
    fanout[(src.numel() // block,)](src, dst, state_elems, tokens, block, streaming,
                                    num_warps=warps)


def time_cell(shape: str, pool: str, B: int, T: int, replays: int) -> dict:
    HV = SHAPES[shape][1]
    state = B * HV * V * K * POOLS[pool].itemsize
    sets = max(2, math.ceil(COLD_BYTES / state))
    src = torch.randn(sets, B, HV, V, K, device="cuda").to(POOLS[pool])
    dst = torch.empty(sets, B, T, HV, V, K, device="cuda", dtype=POOLS[pool])
    copy = time_graph(copy_of(sets, state * (1 + T)), sets, replays)
    best = None
    for block, warps, streaming in itertools.product(BLOCKS, WARPS, (False, True)):
        us = time_graph(lambda i: launch(src[i], dst[i], T, block, warps, streaming), sets,
                        replays)
        if best is None or us < best["floor_us"]:
            best = dict(floor_us=us, block=block, warps=warps, streaming=streaming)
    launch(src[0], dst[0], T, best["block"], best["warps"], best["streaming"])
    assert torch.equal(dst[0], src[0].unsqueeze(1).expand_as(dst[0])), "the floor pass is wrong"
    return dict(shape=shape, pool=pool, B=B, T=T, copy_us=copy, ratio=best["floor_us"] / copy,
                **best)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["TP8"], choices=list(SHAPES))
    parser.add_argument("--pools", nargs="+", default=["fp32"], choices=list(POOLS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[2, 3, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--replays", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for shape, pool, T, B in itertools.product(args.shapes, args.pools, args.tokens, args.batches):
        row = time_cell(shape, pool, B, T, args.replays)
        rows.append(row)
        print(f"{shape} {pool} T={T} B={B:4d}  copy {row['copy_us']:8.2f} us  floor "
              f"{row['floor_us']:8.2f} us  {row['ratio']:5.2f}x  (block {row['block']}, "
              f"{row['warps']} warps, {'streaming' if row['streaming'] else 'plain'} stores)",
              flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
