"""Qwen3-Next generation served the way an engine serves it, every GDN decode step
through gdn_backend.

    python examples/generate.py                     # a small seeded random Qwen3-Next
    python examples/generate.py --full-size-gdn     # the 80B model's per-layer GDN dims
    python examples/generate.py --model DIR         # a local checkpoint (and its tokenizer)

The engine keeps, per layer, a state pool with one slot per request: GDN layers a
recurrent-state pool [slots, HV, V, K] and a conv-state pool, attention layers a
static KV pool. Requests arrive and finish at different steps, so slots are reused;
every step feeds one token per live request (prompt tokens first, then its own
greedy tokens), padded to a captured batch size with slot -1. Each GDN layer's
recurrence runs through `gdn_backend.gated_delta_rule_decode` on its pool in place;
projections, the conv, norms, attention and MLP are the model's own modules. On a
GPU each batch size's step is captured in a CUDA graph; on a CPU the reference path
runs the same program.
"""

from __future__ import annotations

import argparse
import bisect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
from transformers.models.qwen3_next import modeling_qwen3_next as hf

import gdn_backend

PAD_SLOT_ID = -1
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def small_config(full_size_gdn: bool = False) -> Qwen3NextConfig:
    """A small Qwen3-Next (3 GDN layers to 1 attention layer, as the 80B model), dense MLPs.

    full_size_gdn keeps the 80B model's per-layer GDN dims at TP1 (H=16, HV=32, K=V=128)."""
    H, HV = (16, 32) if full_size_gdn else (2, 4)
    return Qwen3NextConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=H, linear_num_value_heads=HV, linear_key_head_dim=128,
        linear_value_head_dim=128, mlp_only_layers=list(range(4)), max_position_embeddings=512,
    )


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    slot: int = -1
    fed: int = 0
    output: list[int] = field(default_factory=list)

    def next_token(self) -> int:
        return self.prompt[self.fed] if self.fed < len(self.prompt) else self.output[-1]

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


class PooledQwen3Next:
    """A Hugging Face Qwen3NextForCausalLM whose per-request state lives in per-layer pools.

    Slot 0 of every pool is a scratch slot: padding rows write their conv and KV
    entries there, so the step has no data-dependent control flow. Requests get
    slots 1..num_slots; the GDN op sees padding as slot -1 and touches nothing.
    """

    def __init__(self, model, num_slots: int, max_len: int, state_dtype=torch.float32):
        self.model, self.config = model, model.config
        cfg, dev, dtype = model.config, model.device, model.dtype
        self.num_slots, self.max_len = num_slots, max_len
        self.ssm, self.conv, self.keys, self.values = {}, {}, {}, {}
        for i, kind in enumerate(cfg.layer_types):
            if kind == "linear_attention":
                m = model.model.layers[i].linear_attn
                self.ssm[i] = torch.zeros(num_slots + 1, m.num_v_heads, m.head_v_dim, m.head_k_dim,
                                          dtype=state_dtype, device=dev)
                self.conv[i] = torch.zeros(num_slots + 1, m.conv_dim, m.conv_kernel_size,
                                           dtype=dtype, device=dev)
            else:
                a = model.model.layers[i].self_attn
                shape = (num_slots + 1, cfg.num_key_value_heads, max_len, a.head_dim)
                self.keys[i] = torch.zeros(shape, dtype=dtype, device=dev)
                self.values[i] = torch.zeros(shape, dtype=dtype, device=dev)
        self.gdn_seconds = 0.0  # eager only: time inside the GDN op, for the share report

    def reset_slot(self, slot: int) -> None:
        """A new request starts from zero recurrent and conv state (its KV is masked by position)."""
        for pool in (*self.ssm.values(), *self.conv.values()):
            pool[slot].zero_()

    @torch.no_grad()
    def step(self, tokens, positions, slots) -> torch.Tensor:
        """One token for each row: tokens, positions [bs] int64, slots [bs] (-1 = padding).
        Returns the next-token logits [bs, vocab]."""
        scratch = slots.clamp(min=0)
        h = self.model.model.embed_tokens(tokens)[:, None, :]
        cos, sin = self.model.model.rotary_emb(h, positions[:, None])
        for i, layer in enumerate(self.model.model.layers):
            x = layer.input_layernorm(h)
            if i in self.ssm:
                x = self.gdn(i, layer.linear_attn, x, slots, scratch)
            else:
                x = self.attention(i, layer.self_attn, x, cos, sin, positions, scratch)
            h = h + x
            mlp = layer.mlp(layer.post_attention_layernorm(h))
            h = h + (mlp[0] if isinstance(mlp, tuple) else mlp)
        return self.model.lm_head(self.model.model.norm(h))[:, 0]

    def gdn(self, i, m, x, slots, scratch):
        """The model's GatedDeltaNet decode for one token, its recurrence on the pool."""
        bs = x.shape[0]
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x), m.in_proj_ba(x))
        mixed = torch.cat([t.reshape(bs, 1, -1) for t in (q, k, v)], dim=-1).transpose(1, 2)
        conv_state = self.conv[i].index_select(0, scratch)
        mixed = hf.causal_conv1d_update(mixed, conv_state, m.conv1d.weight.squeeze(1),
                                        m.conv1d.bias, m.activation)
        self.conv[i].index_copy_(0, scratch, conv_state)
        q, k, v = gdn_backend.split_packed_qkv(mixed.transpose(1, 2), m.num_k_heads, m.num_v_heads,
                                               m.head_k_dim, m.head_v_dim)
        start = time.perf_counter()
        out = gdn_backend.gated_delta_rule_decode(q, k, v, a, b, m.A_log, m.dt_bias, self.ssm[i],
                                                  slots)
        self.gdn_seconds += time.perf_counter() - start
        out = m.norm(out.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
        return m.out_proj(out.reshape(bs, 1, -1))

    def attention(self, i, a, x, cos, sin, positions, scratch):
        """The model's gated attention for one token, over a static per-slot KV pool."""
        bs, hd = x.shape[0], a.head_dim
        q, gate = torch.chunk(a.q_proj(x).view(bs, 1, -1, hd * 2), 2, dim=-1)
        q = a.q_norm(q).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(bs, 1, -1, hd)).transpose(1, 2)
        v = a.v_proj(x).view(bs, 1, -1, hd).transpose(1, 2)
        q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
        self.keys[i][scratch, :, positions] = k[:, :, 0]
        self.values[i][scratch, :, positions] = v[:, :, 0]
        groups = a.num_key_value_groups
        keys = self.keys[i].index_select(0, scratch).repeat_interleave(groups, dim=1)
        values = self.values[i].index_select(0, scratch).repeat_interleave(groups, dim=1)
        visible = torch.arange(self.max_len, device=x.device) <= positions[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :],
                                             scale=a.scaling)
        out = out.transpose(1, 2).reshape(bs, 1, -1) * torch.sigmoid(gate.reshape(bs, 1, -1))
        return a.o_proj(out)


class StepRunner:
    """Runs the engine's step at a captured batch size: eagerly, or as a replayed CUDA graph."""

    def __init__(self, engine: PooledQwen3Next, use_graphs: bool):
        self.engine, self.use_graphs = engine, use_graphs
        self.graphs: dict[int, tuple] = {}

    def warmup(self, buckets) -> None:
        engine = self.engine
        gdn = engine.model.model.layers[next(iter(engine.ssm))].linear_attn
        gdn_backend.warmup(
            device=engine.model.device, num_heads=gdn.num_k_heads, num_v_heads=gdn.num_v_heads,
            head_k_dim=gdn.head_k_dim, head_v_dim=gdn.head_v_dim,
            state_dtype=next(iter(engine.ssm.values())).dtype, qkv_dtype=engine.model.dtype,
            gate_dtype=engine.model.dtype, A_log_dtype=gdn.A_log.dtype,
            dt_bias_dtype=gdn.dt_bias.dtype, index_dtype=torch.int64)
        if self.use_graphs:
            for bs in buckets:
                self.capture(bs)

    def capture(self, bs: int) -> None:
        dev = self.engine.model.device
        tokens = torch.zeros(bs, dtype=torch.long, device=dev)
        positions = torch.zeros(bs, dtype=torch.long, device=dev)
        slots = torch.full((bs,), PAD_SLOT_ID, dtype=torch.long, device=dev)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.engine.step(tokens, positions, slots)  # warm the modules outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.engine.step(tokens, positions, slots)
        self.graphs[bs] = (graph, tokens, positions, slots, logits)

    def __call__(self, tokens, positions, slots) -> torch.Tensor:
        if not self.use_graphs:
            return self.engine.step(tokens, positions, slots)
        graph, t, p, s, logits = self.graphs[tokens.shape[0]]
        t.copy_(tokens), p.copy_(positions), s.copy_(slots)
        graph.replay()
        return logits


def serve(engine: PooledQwen3Next, requests: list[Request], *, use_graphs: bool = False,
          buckets=BUCKETS, progress: bool = False) -> dict:
    """Serve `requests` to completion; fills each request's `output`. Returns timing stats."""
    dev = engine.model.device
    buckets = tuple(b for b in buckets if b <= engine.num_slots) or (1,)
    runner = StepRunner(engine, use_graphs)
    runner.warmup(buckets)
    free = list(range(engine.num_slots, 0, -1))
    waiting = sorted(requests, key=lambda r: r.arrival)
    live: list[Request] = []
    steps = generated = 0
    total = sum(len(r.prompt) + r.max_new_tokens - 1 for r in requests)
    bar = _progress(total) if progress else None
    start = time.perf_counter()
    while waiting or live:
        while waiting and waiting[0].arrival <= steps and free:
            req = waiting.pop(0)
            req.slot = free.pop()
            engine.reset_slot(req.slot)
            live.append(req)
        if not live:
            steps += 1
            continue
        bs = buckets[min(bisect.bisect_left(buckets, len(live)), len(buckets) - 1)]
        batch = live[:bs]
        pad = bs - len(batch)
        tokens = torch.tensor([r.next_token() for r in batch] + [0] * pad, device=dev)
        positions = torch.tensor([r.fed for r in batch] + [0] * pad, device=dev)
        slots = torch.tensor([r.slot for r in batch] + [PAD_SLOT_ID] * pad, device=dev)
        next_tokens = runner(tokens, positions, slots).argmax(dim=-1).tolist()
        for req, tok in zip(batch, next_tokens):
            req.fed += 1
            if req.fed >= len(req.prompt):
                req.output.append(tok)
                generated += 1
            if req.done:
                live.remove(req)
                free.append(req.slot)  # reused by a later request
        steps += 1
        if bar is not None:
            bar.update(len(batch))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return {"steps": steps, "generated": generated, "seconds": seconds,
            "tokens_per_s": total / seconds, "graphs": runner.use_graphs}


def gdn_share(engine: PooledQwen3Next, bs: int) -> float:
    """The share of one decode step's time spent in the GDN op (all GDN layers), on a GPU:
    a CUDA graph of the step against a graph of the same GDN op calls alone."""
    dev = engine.model.device
    tokens = torch.zeros(bs, dtype=torch.long, device=dev)
    slots = torch.arange(1, bs + 1, device=dev)
    layers = [engine.model.model.layers[i].linear_attn for i in engine.ssm]
    inputs = []
    for m in layers:
        mixed = torch.randn(bs, 1, m.conv_dim, device=dev, dtype=engine.model.dtype)
        q, k, v = gdn_backend.split_packed_qkv(mixed, m.num_k_heads, m.num_v_heads, m.head_k_dim,
                                               m.head_v_dim)
        gates = torch.randn(bs, 1, m.num_v_heads, device=dev, dtype=engine.model.dtype)
        inputs.append((q, k, v, gates))

    def gdn_only():
        for (q, k, v, gates), m, pool in zip(inputs, layers, engine.ssm.values()):
            gdn_backend.gated_delta_rule_decode(q, k, v, gates, gates, m.A_log, m.dt_bias, pool, slots)

    def timed(fn) -> float:
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(20):
            graph.replay()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 20

    step = timed(lambda: engine.step(tokens, torch.zeros_like(tokens), slots))
    return timed(gdn_only) / step


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", desc="serving")


def demo_requests(vocab: int, seed: int = 0, count: int = 6) -> list[Request]:
    """Prompts of different lengths arriving at different steps, asking for different lengths."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for n in range(count):
        length = 3 + 2 * n % 7
        prompt = torch.randint(1, vocab, (length,), generator=gen).tolist()
        requests.append(Request(prompt, max_new_tokens=6 + 3 * (n % 3), arrival=2 * n))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Qwen3-Next checkpoint directory")
    parser.add_argument("--full-size-gdn", action="store_true",
                        help="the random model with the 80B model's per-layer GDN dims")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--slots", type=int, default=4, help="state-pool slots (< requests: reuse)")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = None
    if args.model:
        model = Qwen3NextForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device)
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except Exception:
            tokenizer = None
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = Qwen3NextForCausalLM(small_config(args.full_size_gdn)).to(device=device, dtype=dtype)
    model.eval()
    state_dtype = torch.float32 if args.state_dtype == "fp32" else torch.bfloat16
    requests = demo_requests(model.config.vocab_size, count=args.requests)
    engine = PooledQwen3Next(model, args.slots, max_len=64, state_dtype=state_dtype)
    # transformers' MoE block routes with data-dependent shapes, which a CUDA graph cannot hold.
    moe = any(type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.layers)
    if moe and args.graphs and device.type == "cuda":
        print("this checkpoint has MoE layers: running eagerly (transformers' MoE is not graph-safe)")
    use_graphs = args.graphs and device.type == "cuda" and not moe
    stats = serve(engine, requests, use_graphs=use_graphs, progress=True)

    for n, req in enumerate(requests):
        text = tokenizer.decode(req.output) if tokenizer else req.output
        print(f"request {n}: arrived at step {req.arrival}, slot {req.slot}, prompt {req.prompt} -> {text}")
    mode = "CUDA graphs" if stats["graphs"] else "eager"
    print(f"{stats['generated']} tokens generated in {stats['steps']} steps; "
          f"{stats['tokens_per_s']:.1f} tokens/s processed ({mode}, {device})")
    if device.type == "cuda":
        share = gdn_share(engine, min(args.slots, 4))
        print(f"GDN decode share of a decode step: {100 * share:.1f}% (CUDA-graph timing)")
    else:
        print(f"GDN decode share of decode time: {100 * engine.gdn_seconds / stats['seconds']:.1f}% "
              "(eager wall time)")


if __name__ == "__main__":
    main()
