"""Soft prompts: prompt tuning, prefix tuning and P-tuning v2 (PEFT's artifact formats).

One folder, three methods sharing one runtime module, so one registration line each.
"""

from deltahub.methods import register_method

_S, _R = "deltahub.methods.prompt.schema", "deltahub.methods.prompt.runtime"

register_method("prompt_tuning", schema=f"{_S}:check_prompt_tuning", runtime=f"{_R}:PromptTuning")
register_method("prefix_tuning", schema=f"{_S}:check_prefix_tuning", runtime=f"{_R}:PrefixTuning")
register_method("p_tuning", schema=f"{_S}:check_p_tuning", runtime=f"{_R}:PTuning")
# Training names (`deltahub train --method prompt|prefix|ptuning-v2`); their artifacts are
# prompt-tuning and prefix-tuning ones.
register_method("prompt", runtime=f"{_R}:PromptTuning")
register_method("prefix", runtime=f"{_R}:PrefixTuning")
register_method("ptuning-v2", runtime=f"{_R}:PTuningV2")
