"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; parallel, He et al., 2022)."""

from deltahub.methods import register_method

register_method(
    "bottleneck",
    schema="deltahub.methods.bottleneck.schema:check_config",
    runtime="deltahub.methods.bottleneck.runtime:BottleneckAdapter",
)
