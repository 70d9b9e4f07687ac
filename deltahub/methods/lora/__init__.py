"""LoRA (Hu et al., 2021) with rsLoRA, DoRA, lora_bias, embeddings and PEFT's saved modules and
biases; PEFT's artifact format both ways."""

from deltahub.methods import register_method

register_method(
    "lora",
    schema="deltahub.methods.lora.schema:check_config",
    runtime="deltahub.methods.lora.runtime:LoraAdapter",
)
