"""IA3 (Liu et al., 2022): learned rescaling of activations; PEFT's artifact format both ways."""

from deltahub.methods import register_method

register_method(
    "ia3",
    schema="deltahub.methods.ia3.schema:check_config",
    runtime="deltahub.methods.ia3.runtime:IA3Adapter",
)
