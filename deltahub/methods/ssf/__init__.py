"""SSF (Lian et al., 2022): learned per-feature scale and shift of module outputs."""

from deltahub.methods import register_method

register_method(
    "ssf",
    schema="deltahub.methods.ssf.schema:check_config",
    runtime="deltahub.methods.ssf.runtime:SSFAdapter",
)
