"""SGLang's ReplaySSM spec ring (--enable-linear-replayssm-spec) served by gdn_backend.

SGLang runs the spec ring outside its kernel dispatcher, so gdn_backend takes its two
places through SGLang's HookRegistry (AROUND, falling through to SGLang's own code when
another decode backend is selected):
- `GDNAttnBackend._replayssm_target_verify`: the verify, on SGLang's request-row rings and
  the pool's cursors (`gdn_backend.replayssm_spec_verify`);
- `commit_gdn_replayssm_circular` (imported by SGLang's commit at call time): every layer's
  fold, the radix cache's snapshots and the cursors' reset (`gdn_backend.replayssm_spec_fold`).
SGLang's cursor advance before the fold (`commit_gdn_replayssm_spec`, elementwise on the
batch) stays SGLang's; the argument check is let through in `sglang._linear_attn_checks`.
"""

from __future__ import annotations

from .. import replayssm_spec_fold, replayssm_spec_verify

TARGET_VERIFY = ("sglang.srt.layers.attention.linear.gdn_backend.GDNAttnBackend."
                 "_replayssm_target_verify")
FOLD = ("sglang.kernels.ops.attention.linear.gdn_replayssm_spec_decode."
        "commit_gdn_replayssm_circular")


def _selected() -> bool:
    from .sglang import selected  # sglang.py imports this module

    return selected()


def target_verify(original, self, *, layer, query, key, value, a, b, mamba_pool, layer_cache,
                  cache_indices, replay_indices, query_start_loc, draft_token_num):
    """SGLang's verify on the spec ring, by gdn_backend's kernel where it is selected."""
    if not _selected():
        return original(self, layer=layer, query=query, key=key, value=value, a=a, b=b,
                        mamba_pool=mamba_pool, layer_cache=layer_cache,
                        cache_indices=cache_indices, replay_indices=replay_indices,
                        query_start_loc=query_start_loc, draft_token_num=draft_token_num)
    H, K, HV, V = layer.num_k_heads, layer.head_k_dim, layer.num_v_heads, layer.head_v_dim
    seq = query.numel() // (H * K)  # [1, seq, ...] or [seq, ...], as SGLang's own reads them
    out = replayssm_spec_verify(
        query.reshape(1, seq, H, K), key.reshape(1, seq, H, K), value.reshape(1, seq, HV, V),
        a.reshape(1, seq, HV), b.reshape(1, seq, HV), layer.A_log, layer.dt_bias,
        layer_cache.temporal, layer_cache.replayssm_d, layer_cache.replayssm_k,
        layer_cache.replayssm_g, layer_cache.replayssm_rawv, layer_cache.replayssm_rawk,
        query_start_loc, cache_indices, replay_indices, mamba_pool.replayssm_spec_write_pos,
        mamba_pool.replayssm_cache_base, mamba_pool.replayssm_is_flush,
        max_tokens=draft_token_num, scale=K ** -0.5)
    return out.reshape(value.shape)


def fold(original, *, checkpoint_state, d_cache, k_cache, g_cache, d_residual_cache,
         k_residual_cache, state_batch_indices, replay_indices, write_pos, cache_base, is_flush,
         accept_lens, mamba_track_indices=None, mamba_steps_to_track=None, null_block_id=-1):
    """SGLang's commit fold (all layers, then the cursor reset), by gdn_backend's kernels
    where it is selected. SGLang passes null_block_id = -1: negative slots are padding, as
    gdn_backend reads them."""
    if _selected() and null_block_id != -1:
        raise NotImplementedError(
            f"null_block_id={null_block_id}: gdn_backend's fold reads negative slots as "
            "padding (SGLang's -1) and every other slot as a real one")
    if not _selected():
        return original(checkpoint_state=checkpoint_state, d_cache=d_cache, k_cache=k_cache,
                        g_cache=g_cache, d_residual_cache=d_residual_cache,
                        k_residual_cache=k_residual_cache,
                        state_batch_indices=state_batch_indices, replay_indices=replay_indices,
                        write_pos=write_pos, cache_base=cache_base, is_flush=is_flush,
                        accept_lens=accept_lens, mamba_track_indices=mamba_track_indices,
                        mamba_steps_to_track=mamba_steps_to_track, null_block_id=null_block_id)
    has_track = mamba_track_indices is not None and mamba_steps_to_track is not None
    replayssm_spec_fold(checkpoint_state, d_cache, k_cache, g_cache, d_residual_cache,
                        k_residual_cache, state_batch_indices, replay_indices, write_pos,
                        cache_base, is_flush, accept_lens,
                        track_indices=mamba_track_indices if has_track else None,
                        track_steps=mamba_steps_to_track if has_track else None)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET_VERIFY, target_verify, HookType.AROUND)
    HookRegistry.register(FOLD, fold, HookType.AROUND)
