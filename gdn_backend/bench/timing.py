"""SPEC.md's timing: CUDA-graph replay of back-to-back calls, and the copy ceiling."""

from __future__ import annotations

import statistics

import torch


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


def settle(fn, calls: int) -> None:
    """Replay fn's graph a few times, untimed: a cell's setup leaves the GPU idle, and the
    first graph timed after it must not pay for the clocks coming back up."""
    time_graph(fn, calls, replays=3)


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
