"""AdapterFusion (Pfeiffer et al., 2021): the schema lives here, the layer in `deltahub.fusion`."""

from deltahub.methods import register_method

register_method(
    "fusion", schema="deltahub.methods.fusion.schema:check_config", runtime="deltahub.fusion.layer:Fusion"
)
