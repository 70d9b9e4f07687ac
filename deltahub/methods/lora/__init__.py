"""LoRA (Hu et al., 2021) with rsLoRA and DoRA; PEFT's artifact format both ways."""

from deltahub.methods import register_method

register_method(
    "lora",
    schema="deltahub.methods.lora.schema:check_config",
    runtime="deltahub.methods.lora.runtime:LoraAdapter",
)
