"""gdn_backend: pooled Gated DeltaNet decode for serving engines.

The public API: the op, its warm-up, the out-of-range error flag, and the view of
packed q|k|v rows that engines hand over.
"""

from .errors import clear_error_flag, error_flag, read_error_flag
from .op import gated_delta_rule_decode, split_packed_qkv, warmup

__all__ = [
    "gated_delta_rule_decode",
    "warmup",
    "split_packed_qkv",
    "error_flag",
    "read_error_flag",
    "clear_error_flag",
]
__version__ = "0.1.0"
