"""A Qwen3-Next GDN layer sharded over tensor-parallel ranks, as SGLang's and vLLM's workers
run it: one process a rank (torch.distributed), each with its own device and its own pool
holding its heads (TP2: H = 8, HV = 16 a rank), the shards' outputs gathered into the
layer's.

`worker` is what each process runs; `unsharded_steps` is the layer on one device through
the reference, the answer the gathered shards must give. Used by test_tensor_parallel.py.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import gdn_backend

H, HV, K, V = 16, 32, 128, 128   # Qwen3-Next's GDN layer, unsharded
NUM_SLOTS = 8
# Each step's slots: reused across steps, padding (-1) in a batch of fixed size (a graph's).
STEPS = [[3, 7, -1, 1], [7, 2, 5, -1], [1, 3, -1, -1], [6, 7, 2, 4], [7, -1, -1, -1]]
SEED = 2000


def full_layer() -> dict:
    """The layer's pool, parameters and every step's inputs, on the CPU, from SEED."""
    gen = torch.Generator().manual_seed(SEED)
    B = len(STEPS[0])

    def randn(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    steps = [dict(q=randn(B, 1, H, K), k=randn(B, 1, H, K), v=randn(B, 1, HV, V),
                  a=randn(B, 1, HV), b=randn(B, 1, HV),
                  idx=torch.tensor(slots, dtype=torch.int32)) for slots in STEPS]
    return dict(pool=randn(NUM_SLOTS, HV, V, K, dtype=torch.float32, scale=0.5),
                A_log=(torch.rand(HV, generator=gen) * 15 + 1).log(),
                dt_bias=randn(HV, dtype=torch.float32, scale=0.5), steps=steps)


def shard(layer: dict, rank: int, world: int, device) -> dict:
    """Rank `rank`'s heads of everything: key heads and value heads split alike, so each
    rank keeps whole groups of value heads a key head."""
    h = slice(rank * H // world, (rank + 1) * H // world)
    hv = slice(rank * HV // world, (rank + 1) * HV // world)

    def own(x):
        return x.contiguous().to(device)

    steps = [dict(q=own(s["q"][:, :, h]), k=own(s["k"][:, :, h]), v=own(s["v"][:, :, hv]),
                  a=own(s["a"][..., hv]), b=own(s["b"][..., hv]), idx=own(s["idx"]))
             for s in layer["steps"]]
    return dict(pool=own(layer["pool"][:, hv]), A_log=own(layer["A_log"][hv]),
                dt_bias=own(layer["dt_bias"][hv]), steps=steps)


def gather_heads(x: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """Every rank's shard of x, joined along its head dim, as the layer's output projection
    sees them (an all-gather here, where the model reduces)."""
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim).cpu()


def eager_steps(mine: dict) -> list[torch.Tensor]:
    return [gdn_backend.gated_delta_rule_decode(s["q"], s["k"], s["v"], s["a"], s["b"],
                                                mine["A_log"], mine["dt_bias"], mine["pool"],
                                                s["idx"])
            for s in mine["steps"]]


def graph_steps(mine: dict, device: torch.device) -> list[torch.Tensor]:
    """One CUDA graph captured on this rank's device, replayed for every step with the
    step's inputs and slots copied into its buffers, as the engines' decode graphs run."""
    first = mine["steps"][0]
    gdn_backend.warmup(device=device, num_heads=first["q"].shape[2],
                       num_v_heads=first["v"].shape[2], dt_bias_dtype=torch.float32)
    static = {name: torch.empty_like(t) for name, t in first.items()}
    out = torch.empty_like(first["v"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gdn_backend.gated_delta_rule_decode(static["q"], static["k"], static["v"], static["a"],
                                            static["b"], mine["A_log"], mine["dt_bias"],
                                            mine["pool"], static["idx"], out=out)
    outs = []
    for s in mine["steps"]:
        for name, t in s.items():
            static[name].copy_(t)
        graph.replay()
        outs.append(out.clone())
    return outs


def worker(rank: int, world: int, backend: str, init_method: str, out_dir: str) -> None:
    """One TP rank: its shard on its device (cuda:rank with NCCL, the CPU with gloo), every
    step eagerly and (on CUDA) replayed from a graph, each on a pool of its own; rank 0
    writes the gathered outputs and pools to out_dir/result.pt."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (the lender's rule)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        layer = full_layer()
        result = {}
        modes = ("eager", "graph") if device.type == "cuda" else ("eager",)
        for mode in modes:
            mine = shard(layer, rank, world, device)
            outs = eager_steps(mine) if mode == "eager" else graph_steps(mine, device)
            flag = gdn_backend.read_error_flag(device)
            result[mode] = dict(
                outs=[gather_heads(o, 2, world) for o in outs],
                pool=gather_heads(mine["pool"], 1, world),
                flag_set=gather_heads(torch.tensor([int(flag)], device=device), 0, world),
                devices=gather_heads(torch.tensor([mine["pool"].device.index or 0],
                                                  device=device), 0, world))
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        # Tear down together: a rank leaving gloo while the other still talks to it has
        # aborted the process ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def unsharded_steps() -> tuple[list[torch.Tensor], torch.Tensor]:
    """The whole layer's outputs and final pool, through the reference on the CPU."""
    from gdn_backend.reference import gated_delta_rule_decode_reference

    layer = full_layer()
    pool, outs = layer["pool"].clone(), []
    for s in layer["steps"]:
        out = torch.empty_like(s["v"])
        gated_delta_rule_decode_reference(s["q"], s["k"], s["v"], s["a"], s["b"],
                                          layer["A_log"], layer["dt_bias"], pool, s["idx"], out,
                                          scale=K ** -0.5)
        outs.append(out)
    return outs, pool
