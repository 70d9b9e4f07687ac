"""BitFit (Ben Zaken et al., 2022): train only the bias terms."""

from deltahub.methods import register_method

register_method(
    "bitfit",
    schema="deltahub.methods.bitfit.schema:check_config",
    runtime="deltahub.methods.bitfit.runtime:BitFitAdapter",
)
