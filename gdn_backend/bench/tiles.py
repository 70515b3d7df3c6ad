"""Tile shapes on the command line, and forcing one in place of the dispatch's choice:
the sweep behind the dispatch rules (--tiles)."""

from __future__ import annotations

import argparse
import contextlib
import re
from dataclasses import replace

from ..kernels import launch
from ..kernels.heuristics import LANES_PER_ROW, Tile

V = 128


def parse_tile(text: str) -> Tile:
    """"RxT" -> Tile(R rows per CTA, T rows per thread), for a tile the kernel can build at V=128;
    "RxNtc": R rows per CTA, N a thread, on the tensor-core kernel (bf16 pools, T <= 4; the
    spec ring's verify, T <= 4, and fold); "RxNtcs" / "RxNtcr": the spec ring's tensor-core
    kernels with their checkpoint rows staged in shared memory / in registers (else where the
    dispatch puts them); "RxNm" / "RxNc": ReplaySSM decode with its flush on tensor cores /
    on CUDA cores (else as the dispatch does)."""
    match = re.fullmatch(r"(\d+)x(\d+)(?:(tc)([sr])?|([mc]))?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a tile: write rows_per_cta x rows_per_thread, e.g. 32x4 or 32x2tc")
    staged = None if match[4] is None else match[4] == "s"
    flush_mma = None if match[5] is None else match[5] == "m"
    tile = Tile(int(match[1]), int(match[2]), tensor_cores=bool(match[3]), staged_rows=staged,
                flush_mma=flush_mma)
    if tile.tensor_cores:
        warp_rows = 8 * tile.rows_per_thread
        if tile.rows_per_thread % 2 or tile.rows_per_cta % warp_rows or V % tile.rows_per_cta:
            raise argparse.ArgumentTypeError(
                f"tile {text}: a tensor-core tile is RxNtc: N even, a warp holds 8N rows, and R, a "
                f"multiple of 8N, divides V = {V}")
    elif (tile.rows_per_cta < 1 or V % tile.rows_per_cta or tile.rows_per_thread < 1
            or tile.rows_per_cta % tile.rows_per_thread or tile.threads % 32 or tile.threads > 1024):
        raise argparse.ArgumentTypeError(
            f"tile {text}: rows per CTA must divide V = {V}, rows per thread must divide them, and "
            f"{LANES_PER_ROW} lanes per row group must make whole warps (32 to 1024 threads)")
    return tile


def tile_name(tile: Tile) -> str:
    if tile.tensor_cores:
        suffix = "tc" + {None: "", True: "s", False: "r"}[tile.staged_rows]
    else:
        suffix = {None: "", True: "m", False: "c"}[tile.flush_mma]
    return f"{tile.rows_per_cta}x{tile.rows_per_thread}{suffix}"


@contextlib.contextmanager
def forced_tile(tile: Tile):
    """Within: every decode launch (ReplaySSM's rings and the spec ring's too) takes `tile` in
    place of the dispatch's choice; a tensor-core tile only those with a tensor-core form (the
    decode, the spec verify and fold). What the tile leaves open (None: where a tensor-core
    tile puts the spec ring's checkpoint rows, whether a ReplaySSM flush runs on tensor
    cores, whether an fp32 verify streams its intermediate rows) stays the dispatch's."""
    names = ("choose_tile", "choose_spec_verify_tile", "choose_spec_fold_tile")
    if not tile.tensor_cores:  # ReplaySSM decode has no tensor-core form: it keeps its own
        names += ("choose_ring_tile",)
    chosen = [getattr(launch, name) for name in names]
    open_fields = [f for f in ("staged_rows", "flush_mma", "streaming_rows")
                   if getattr(tile, f) is None]

    def forcing(choose):
        def forced(*shape, **options):
            dispatched = choose(*shape, **options)
            return replace(tile, **{f: getattr(dispatched, f) for f in open_fields})
        return forced

    for name, choose in zip(names, chosen):
        setattr(launch, name, forcing(choose))
    try:
        yield
    finally:
        for name, choice in zip(names, chosen):
            setattr(launch, name, choice)
