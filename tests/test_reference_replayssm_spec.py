"""SGLang's ReplaySSM spec ring (the spec mode's reference) against the classic decode: over
many verify and commit steps with rejected drafts, ragged windows, padding and folds at
capacity, every verify output is the classic step's from the true state, and the
checkpoint and ring always stand for that state."""

import pytest
import torch

from gdn_backend.reference import gated_delta_rule_decode_reference
from gdn_backend.reference_replayssm_spec import (
    replayssm_spec_commit_reference, replayssm_spec_state, replayssm_spec_verify_reference)
from gdn_backend.testing import relative_error

H, HV, K, V, L, T = 2, 4, 32, 16, 16, 4
SCALE = K**-0.5
TOL = 2e-5


class SpecRing:
    """A layer's checkpoints by slot, its bf16 rings (high and low parts) and cursors by
    request row, as SGLang's MambaPool holds them; beside them each request's true state."""

    def __init__(self, slots, rows, checkpoint_dtype=torch.float32, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.checkpoint = (torch.randn(slots, HV, V, K, generator=self.gen) * 0.5).to(
            checkpoint_dtype)
        self.ring_d = torch.randn(rows, HV, L, V, generator=self.gen).bfloat16()  # stale
        self.ring_k = torch.randn(rows, H, L, K, generator=self.gen).bfloat16()
        self.ring_d_low, self.ring_k_low = self.ring_d * 0, self.ring_k * 0
        self.ring_g = -torch.rand(rows, HV, L, generator=self.gen)
        self.write_pos = torch.zeros(rows, dtype=torch.int32)
        self.cache_base = torch.randint(0, L, (rows,), generator=self.gen).to(torch.int32)
        self.is_flush = torch.zeros(rows, dtype=torch.int8)
        self.A_log = (torch.rand(HV, generator=self.gen) * 15 + 1).log()
        self.dt_bias = torch.randn(HV, generator=self.gen) * 0.5
        self.true = {}  # slot -> the state the checkpoint and ring stand for

    @property
    def rings(self):
        return self.ring_d, self.ring_k, self.ring_g, self.ring_d_low, self.ring_k_low

    def state(self, slot, row):
        return replayssm_spec_state(self.checkpoint, *self.rings, slot, row, self.write_pos,
                                    self.cache_base)

    def tokens(self, n):
        q, k = (torch.randn(n, H, K, generator=self.gen).bfloat16() for _ in range(2))
        v = torch.randn(n, HV, V, generator=self.gen).bfloat16()
        a, b = (torch.randn(n, HV, generator=self.gen).bfloat16() for _ in range(2))
        return q, k, v, a, b

    def classic(self, state, q, k, v, a, b):
        """The classic steps from `state` over one window: (outputs [n, HV, V], states after each)."""
        n = q.shape[0]
        pool = state[None].clone()
        out = torch.empty(1, n, HV, V, dtype=torch.bfloat16)
        inter = torch.empty(1, n, HV, V, K)
        gated_delta_rule_decode_reference(
            q[None], k[None], v[None], a[None], b[None], self.A_log, self.dt_bias, pool,
            torch.zeros(1, dtype=torch.int32), out, scale=SCALE, intermediate_states=inter)
        return out[0], inter[0]

    def step(self, requests, accept, lengths=None):
        """One verify and commit. requests: (slot, row) pairs, slot -1 padding; accept:
        tokens accepted a request; lengths: its window (T by default). Returns the
        verify's outputs and the classic outputs of the real requests' windows."""
        lengths = lengths or [T] * len(requests)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v, a, b = self.tokens(int(cu[-1]))
        slots = torch.tensor([s for s, _ in requests], dtype=torch.int32)
        rows = torch.tensor([r for _, r in requests], dtype=torch.int32)
        out = torch.full((int(cu[-1]), HV, V), float("nan"), dtype=torch.bfloat16)
        replayssm_spec_verify_reference(
            q, k, v, a, b, self.A_log, self.dt_bias, self.checkpoint, *self.rings, cu, slots,
            rows, self.write_pos, self.cache_base, self.is_flush, out, scale=SCALE)
        want = torch.zeros_like(out)
        for n, (slot, _) in enumerate(requests):
            if slot < 0:
                continue
            window = slice(int(cu[n]), int(cu[n + 1]))
            outputs, states = self.classic(self.true[slot], q[window], k[window], v[window],
                                           a[window], b[window])
            want[window] = outputs
            self.true[slot] = states[accept[n] - 1]
        replayssm_spec_commit_reference(
            self.checkpoint, *self.rings, slots, rows, self.write_pos, self.cache_base,
            self.is_flush, torch.tensor(accept, dtype=torch.int32), max_tokens=T)
        return out, want


def fresh(ring, slots):
    for slot in slots:
        ring.true[slot] = ring.checkpoint[slot].float().clone()


def test_verify_outputs_are_the_classic_steps_and_the_ring_stands_for_the_true_state():
    ring = SpecRing(slots=6, rows=5, seed=1)
    requests = [(1, 0), (4, 3), (2, 1)]
    fresh(ring, [1, 4, 2])
    gen = torch.Generator().manual_seed(2)
    folds = 0
    for step in range(12):
        accept = torch.randint(1, T + 1, (3,), generator=gen).tolist()
        out, want = ring.step(requests, accept)
        assert relative_error(out, want) < 8e-3, f"step {step}"
        folds += int((ring.write_pos == 0).sum())
        for slot, row in requests:
            assert relative_error(ring.state(slot, row), ring.true[slot]) < TOL, f"step {step}"
    assert folds >= 3


def test_a_float32_checkpoint_folds_once_the_next_window_might_not_fit():
    ring = SpecRing(slots=2, rows=2, seed=3)
    fresh(ring, [1])
    before = ring.checkpoint[1].clone()
    ring.step([(1, 0)], [4])
    ring.step([(1, 0)], [4])       # 8 records: 8 + 2T <= L, no fold
    assert ring.write_pos[0] == 8 and torch.equal(ring.checkpoint[1], before)
    ring.step([(1, 0)], [1])       # 9 records: 9 + 2T > L, folded
    assert ring.write_pos[0] == 0 and ring.is_flush[0] == 0
    assert relative_error(ring.checkpoint[1], ring.true[1]) < TOL


def test_a_bf16_checkpoint_folds_at_every_commit():
    ring = SpecRing(slots=2, rows=2, checkpoint_dtype=torch.bfloat16, seed=4)
    fresh(ring, [1])
    for accepted in (2, 3, 1):
        ring.step([(1, 1)], [accepted])
        assert ring.write_pos[1] == 0
        assert relative_error(ring.checkpoint[1], ring.true[1]) < 8e-3


def test_ragged_windows_and_a_padding_row():
    ring = SpecRing(slots=5, rows=4, seed=5)
    fresh(ring, [2, 3])
    untouched = [t.clone() for t in (ring.checkpoint[0], ring.ring_d[2], ring.ring_g[2])]
    for step in range(6):
        out, want = ring.step([(2, 1), (-1, 2), (3, 0)], [2, 1, 1], lengths=[3, 2, 1])
        assert relative_error(out, want) < 8e-3
        assert (out[3:5] == 0).all()  # the padding row's window
    for now, then in zip((ring.checkpoint[0], ring.ring_d[2], ring.ring_g[2]), untouched):
        assert torch.equal(now, then)
    for slot, row in ((2, 1), (3, 0)):
        assert relative_error(ring.state(slot, row), ring.true[slot]) < TOL


def test_a_track_row_snapshots_the_state_after_its_step():
    ring = SpecRing(slots=4, rows=2, seed=6)
    fresh(ring, [1])
    ring.step([(1, 0)], [3])
    q, k, v, a, b = ring.tokens(T)
    out = torch.empty(T, HV, V, dtype=torch.bfloat16)
    cu = torch.tensor([0, T], dtype=torch.int32)
    slot, row = torch.tensor([1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    replayssm_spec_verify_reference(q, k, v, a, b, ring.A_log, ring.dt_bias, ring.checkpoint,
                                    *ring.rings, cu, slot, row, ring.write_pos, ring.cache_base,
                                    ring.is_flush, out, scale=SCALE)
    _, states = ring.classic(ring.true[1], q, k, v, a, b)
    replayssm_spec_commit_reference(
        ring.checkpoint, *ring.rings, slot, row, ring.write_pos, ring.cache_base, ring.is_flush,
        torch.tensor([3], dtype=torch.int32), max_tokens=T,
        track_indices=torch.tensor([3]), track_steps=torch.tensor([1]))
    assert relative_error(ring.checkpoint[3], states[1]) < TOL


@pytest.mark.parametrize("accepted", [1, T])
def test_rejected_drafts_leave_no_trace_in_the_state(accepted):
    ring = SpecRing(slots=2, rows=1, seed=7)
    fresh(ring, [1])
    ring.step([(1, 0)], [accepted])
    assert ring.write_pos[0] == accepted
    assert relative_error(ring.state(1, 0), ring.true[1]) < TOL


def test_every_layer_folds_before_the_shared_cursors_start_over():
    """SGLang's cursors are shared by a step's GDN layers: each layer folds its own W'
    records, and only then do the rings start over."""
    from gdn_backend.reference_replayssm_spec import (
        replayssm_spec_finish_reference, replayssm_spec_fold_reference)

    layers = [SpecRing(slots=2, rows=1, seed=8 + i) for i in range(2)]
    first = layers[0]
    first.write_pos[0], first.is_flush[0] = 11, 1
    for ring in layers[1:]:  # one set of cursors for every layer
        ring.write_pos, ring.cache_base, ring.is_flush = first.write_pos, first.cache_base, first.is_flush
    want = [ring.state(1, 0) for ring in layers]
    slots, rows = torch.tensor([1]), torch.tensor([0])
    for ring in layers:
        replayssm_spec_fold_reference(ring.checkpoint, *ring.rings, slots, rows, ring.write_pos,
                                      ring.cache_base, ring.is_flush, torch.tensor([3]))
    replayssm_spec_finish_reference(first.write_pos, first.cache_base, first.is_flush, slots,
                                    rows, ring_len=L)
    assert first.write_pos[0] == 0 and first.is_flush[0] == 0
    for ring, state in zip(layers, want):
        assert relative_error(ring.checkpoint[1], state) < TOL
