"""gdn_backend: pooled Gated DeltaNet decode for serving engines.

The public API: the op and its ReplaySSM forms (decode ring, spec ring), their warm-ups, the out-of-range error flag, and the view of
packed q|k|v rows that engines hand over.
"""

from .errors import clear_error_flag, error_flag, read_error_flag
from .op import gated_delta_rule_decode, split_packed_qkv, warmup
from .replayssm import replayssm_decode, warmup_replayssm
from .replayssm_spec import replayssm_spec_fold, replayssm_spec_verify, warmup_replayssm_spec

__all__ = [
    "gated_delta_rule_decode",
    "warmup",
    "replayssm_decode",
    "warmup_replayssm",
    "replayssm_spec_verify",
    "replayssm_spec_fold",
    "warmup_replayssm_spec",
    "split_packed_qkv",
    "error_flag",
    "read_error_flag",
    "clear_error_flag",
]
__version__ = "0.1.0"
