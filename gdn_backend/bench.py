"""The decode benchmark, SPEC.md's method: python -m gdn_backend.bench [--json PATH]

Every cell is timed under CUDA-graph replay with a cold L2: one graph holds
`sets` launches back to back, each on a disjoint set of scattered slots, at
least 256 MiB of state in all, so no slot is still cached when it is read again.
The time of a cell is the median replay over the launches in it. Beside every
cell the same graph method times a plain device copy of the same bytes (as many
slots as the batch has valid requests, read and written): the floor a decode is
held against. The copy ceiling (the best of 256 MiB to 1 GiB device copies) is
measured once.

Peers, when they import: a plain PyTorch gather -> step -> scatter, and
flash-linear-attention's fused_recurrent_gated_delta_rule with gather/scatter,
both given the valid rows only (neither handles padding in place); and SGLang's
own Triton decode, on the pool in place, timed like ours: its packed decode at
T = 1 (SGLang's default on CUDA), its unpacked one for T > 1 (bench_sglang.py says
how to run it where SGLang is not installed).

--tiles 32x4 32x2 ... also times every cell with each given tile (rows per CTA x rows per
thread) in place of the dispatch's choice: the sweep behind the dispatch rules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import sys

import torch

from . import bench_sglang
from .kernels import launch
from .kernels.heuristics import LANES_PER_ROW, Tile, serves
from .op import gated_delta_rule_decode, split_packed_qkv, warmup
from .reference import gate_and_beta, l2_normalize

SHAPES = {"TP1": (16, 32), "TP8": (2, 4)}
BATCHES = (1, 4, 16, 32, 64, 128, 256)
TOKENS = (1, 2, 4)
POOLS = {"fp32": torch.float32, "bf16": torch.bfloat16}
K = V = 128
COLD_BYTES = 256 << 20
MAX_SETS = 1024


def time_graph(fn, calls: int, replays: int) -> float:
    """Median µs per call of `calls` back-to-back calls of fn(i), captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(0)  # peers (Triton) compile here, outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def parse_tile(text: str) -> Tile:
    """"RxT" -> Tile(R rows per CTA, T rows per thread), for a tile the kernel can build at V=128;
    "RxNtc": R rows per CTA, N a thread, on the tensor-core kernel (bf16 pools, T <= 4)."""
    match = re.fullmatch(r"(\d+)x(\d+)(tc)?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a tile: write rows_per_cta x rows_per_thread, e.g. 32x4 or 32x2tc")
    tile = Tile(int(match[1]), int(match[2]), tensor_cores=bool(match[3]))
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
    return f"{tile.rows_per_cta}x{tile.rows_per_thread}{'tc' if tile.tensor_cores else ''}"


@contextlib.contextmanager
def forced_tile(tile: Tile):
    """Within: every decode launch takes `tile` in place of the dispatch's choice."""
    chosen = launch.choose_tile
    launch.choose_tile = lambda *shape, **options: tile
    try:
        yield
    finally:
        launch.choose_tile = chosen


def copy_ceiling_tbps() -> float:
    """The best device-to-device copy rate (read + write) over a few large sizes."""
    best = 0.0
    for mib in (256, 512, 1024):
        n = mib << 18  # fp32 elements
        src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        for _ in range(50):  # let clocks ramp up before timing
            dst.copy_(src)
        us = time_graph(lambda i: dst.copy_(src), calls=8, replays=20)
        best = max(best, 2 * n * 4 / (us * 1e-6) / 1e12)
    return best


class Cell:
    """One benchmark cell: a pool holding `sets` disjoint sets of scattered slots."""

    def __init__(self, shape: str, pool: str, B: int, T: int, seed: int = 0):
        self.H, self.HV = SHAPES[shape]
        self.B, self.T = B, T
        self.valid = B - 1 if B >= 4 else B  # one padding row in every batch of B >= 4
        self.slot_bytes = self.HV * V * K * POOLS[pool].itemsize
        set_bytes = self.valid * self.slot_bytes
        self.sets = max(2, min(MAX_SETS, math.ceil(COLD_BYTES / set_bytes)))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        P = self.sets * self.valid
        self.pool = torch.randn(P, self.HV, V, K, device="cuda").mul_(0.5).to(POOLS[pool])
        order = torch.randperm(P, generator=gen).view(self.sets, self.valid).to(torch.int32)
        pad = torch.full((self.sets, B - self.valid), -1, dtype=torch.int32)
        self.indices = torch.cat([order, pad], dim=1).cuda()  # [sets, B], padding last
        mixed = torch.randn(B, T, 2 * self.H * K + self.HV * V, generator=gen).to(torch.bfloat16)
        self.q, self.k, self.v = split_packed_qkv(mixed.cuda(), self.H, self.HV, K, V)
        self.a = torch.randn(B, T, self.HV, generator=gen).to(torch.bfloat16).cuda()
        self.b = torch.randn(B, T, self.HV, generator=gen).to(torch.bfloat16).cuda()
        self.A_log = (torch.rand(self.HV, generator=gen) * 15 + 1).log().cuda()
        self.dt_bias = torch.randn(self.HV, generator=gen).cuda()
        self.out = torch.empty(B, T, self.HV, V, dtype=torch.bfloat16, device="cuda")

    @property
    def bytes(self) -> int:
        return 2 * self.valid * self.slot_bytes

    def ours(self, i: int) -> None:
        gated_delta_rule_decode(self.q, self.k, self.v, self.a, self.b, self.A_log, self.dt_bias,
                                self.pool, self.indices[i], out=self.out)

    def copy_of_same_bytes(self):
        """fn(i) copying set i's worth of slots to a set of their own (cold both ways)."""
        n = self.valid * self.slot_bytes // 4
        src = self.pool.view(-1).view(torch.int32)[: self.sets * n].view(self.sets, n)
        dst = torch.empty_like(src)
        return lambda i: dst[i].copy_(src[i])

    def torch_peer(self, i: int) -> None:
        idx = self.indices[i, : self.valid].long()
        n = self.valid
        q = l2_normalize(self.q[:n].float()).repeat_interleave(self.HV // self.H, 2) * K**-0.5
        k = l2_normalize(self.k[:n].float()).repeat_interleave(self.HV // self.H, 2)
        g, beta = gate_and_beta(self.a[:n], self.b[:n], self.A_log, self.dt_bias)
        S = self.pool.index_select(0, idx).float()
        for t in range(self.T):
            S = S * g[:, t].exp()[..., None, None]
            u = beta[:, t, :, None] * (self.v[:n, t].float() - torch.einsum("nhvk,nhk->nhv", S, k[:, t]))
            S = S + u[..., None] * k[:, t, :, None, :]
            self.out[:n, t] = torch.einsum("nhvk,nhk->nhv", S, q[:, t]).to(self.out.dtype)
        self.pool.index_copy_(0, idx, S.to(self.pool.dtype))

    def fla_peer(self):
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

        n = self.valid
        q, k, v = (x[:n].contiguous() for x in (self.q, self.k, self.v))

        def run(i: int) -> None:
            idx = self.indices[i, :n].long()
            o, final = fused_recurrent_gated_delta_rule(
                q, k, v, g=self.a[:n], beta=self.b[:n], initial_state=self.pool.index_select(0, idx),
                output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                A_log=self.A_log, dt_bias=self.dt_bias, use_beta_sigmoid_in_kernel=True,
                state_v_first=True)
            self.pool.index_copy_(0, idx, final.to(self.pool.dtype))
        return run


def have_fla() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        return True
    except Exception:
        return False


def run(shapes, pools, batches, tokens, replays: int, peers: bool, tiles=()) -> dict:
    ceiling = copy_ceiling_tbps()
    print(f"copy ceiling: {ceiling:.2f} TB/s (best large device copy, read + write)", flush=True)
    fla = peers and have_fla()
    sglang = peers and bench_sglang.available()
    rows = []
    header = (f"{'shape':5} {'pool':4} {'T':>1} {'B':>4} | {'ours µs':>8} {'copy µs':>8} {'ratio':>6} "
              f"{'TB/s':>5} {'%ceil':>5} | {'torch µs':>8} {'ratio':>6} | {'fla µs':>8} {'ratio':>6} | "
              f"{'sglang µs':>8} {'ratio':>6}")
    print(header)
    for shape in shapes:
        for pool in pools:
            for T in tokens:
                warmup(device="cuda", num_heads=SHAPES[shape][0], num_v_heads=SHAPES[shape][1],
                       state_dtype=POOLS[pool], tokens=(T,))
                for B in batches:
                    cell = Cell(shape, pool, B, T)
                    ours = time_graph(cell.ours, cell.sets, replays)
                    copy = time_graph(cell.copy_of_same_bytes(), cell.sets, replays)
                    row = dict(shape=shape, pool=pool, T=T, B=B, valid=cell.valid, bytes=cell.bytes,
                               sets=cell.sets, ours_us=ours, copy_us=copy, ratio=ours / copy,
                               tbps=cell.bytes / (ours * 1e-6) / 1e12)
                    row["pct_ceiling"] = 100 * row["tbps"] / ceiling
                    for tile in tiles:
                        if not serves(tile, T, POOLS[pool].itemsize):
                            continue
                        with forced_tile(tile):
                            row.setdefault("tile_us", {})[tile_name(tile)] = time_graph(
                                cell.ours, cell.sets, replays)
                    if peers:
                        calls = min(cell.sets, 256)
                        row["torch_us"] = time_graph(cell.torch_peer, calls, replays)
                        if fla:
                            row["fla_us"] = time_graph(cell.fla_peer(), calls, replays)
                        if sglang:
                            row["sglang_us"] = time_graph(bench_sglang.decode(cell), cell.sets,
                                                          replays)
                    rows.append(row)
                    print(format_row(row), flush=True)
                    del cell
                    torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_ceiling_tbps": ceiling,
            "sglang": bench_sglang.version() if sglang else None,
            "method": "CUDA-graph replay, cold L2 (>= 256 MiB of disjoint slot sets per replay), "
                      "median of replays; copy = device copy of the same bytes, same method",
            "rows": rows}


def format_row(r: dict) -> str:
    def peer(key):
        if key not in r:
            return f"{'-':>8} {'-':>6}"
        return f"{r[key]:8.2f} {r[key] / r['copy_us']:5.2f}x"
    tiles = "".join(f" | {name} {us / r['copy_us']:5.2f}x" for name, us in r.get("tile_us", {}).items())
    return (f"{r['shape']:5} {r['pool']:4} {r['T']:>1} {r['B']:>4} | {r['ours_us']:8.2f} "
            f"{r['copy_us']:8.2f} {r['ratio']:5.2f}x {r['tbps']:5.2f} {r['pct_ceiling']:5.1f} | "
            f"{peer('torch_us')} | {peer('fla_us')} | {peer('sglang_us')}{tiles}")


PEERS = {"ours_us": "gdn_backend", "torch_us": "PyTorch gather-step-scatter",
         "fla_us": "FLA fused_recurrent + gather/scatter",
         "sglang_us": "SGLang's Triton decode (packed at T=1)"}


def plot(result: dict, path: str) -> None:
    """Time over the copy of the same bytes against B: a panel per shape, pool and T, a line
    per kernel and peer, 1.0 (the copy) drawn. Needs matplotlib (not on the GPU machine:
    plot there from the JSON with --plot-from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = sorted({(r["shape"], r["pool"], r["T"]) for r in rows})
    cols = len({p[2] for p in panels})
    fig, axes = plt.subplots(len(panels) // cols, cols, figsize=(4.2 * cols, 3.2 * len(panels) // cols),
                             squeeze=False, sharex=True)
    for ax, (shape, pool, T) in zip(axes.flat, panels):
        cell = sorted((r for r in rows if (r["shape"], r["pool"], r["T"]) == (shape, pool, T)),
                      key=lambda r: r["B"])
        for key, label in PEERS.items():
            if key in cell[0]:
                ax.plot([r["B"] for r in cell], [r[key] / r["copy_us"] for r in cell], marker="o",
                        label=label)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="copy of the same bytes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} {pool} pool, T={T}", fontsize=10)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("time / copy")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Pooled GDN decode on {result['device']} (cold L2, CUDA-graph replay; "
                 f"copy ceiling {result['copy_ceiling_tbps']:.2f} TB/s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=list(POOLS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
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
    result = run(args.shapes, args.pools, args.batches, args.tokens, args.replays, args.peers,
                 args.tiles)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
