"""LoRA delta arithmetic that produces a new LoRA artifact: linear, cat, svd, ties, dare.

Each input adapter i updates a module by dW_i = s_i B_i A_i, B_i (d_out, r_i),
A_i (r_i, d_in), with s_i its scaling; given weights w_i (negative allowed: task
negation) the methods combine c_i = w_i s_i times the factors. By job:

- `exact.py`: merges in factor space that are exact (cat) or the best rank-k
  approximation of the exact sum (svd, `low_rank_sum`), never forming d_out x d_in;
- `peft_methods.py`: PEFT's `add_weighted_adapter` methods (linear, ties, dare_linear,
  dare_ties), which act on each factor separately and match PEFT's results;
- `peft_format.py`: PEFT LoRA state dicts and configs in and out (`lora_modules`,
  the merged config with scaling 1, `load_tensors`);
- `loras.py`: `merge_loras`, pure (configs + tensors in, tensors + config out);
- `publish.py`: `merge_adapters`, which resolves registry refs, checks the bases, and
  publishes the result with its parents pinned by digest.
"""

from __future__ import annotations

from deltahub.compose.merge.exact import low_rank_sum
from deltahub.compose.merge.loras import (
    DENSITY_METHODS,
    METHODS,
    SAME_RANK_METHODS,
    SIGN_METHODS,
    Method,
    Progress,
    merge_loras,
)
from deltahub.compose.merge.peft_format import (
    A_SUFFIX,
    B_SUFFIX,
    M_SUFFIX,
    PEFT_PREFIX,
    LoraModule,
    load_tensors,
    lora_modules,
    peft_key,
)
from deltahub.compose.merge.publish import merge_adapters

__all__ = [
    "A_SUFFIX", "B_SUFFIX", "DENSITY_METHODS", "METHODS", "M_SUFFIX", "PEFT_PREFIX", "SAME_RANK_METHODS",
    "SIGN_METHODS", "LoraModule", "Method", "Progress", "load_tensors", "lora_modules", "low_rank_sum",
    "merge_adapters", "merge_loras", "peft_key",
]  # fmt: skip
