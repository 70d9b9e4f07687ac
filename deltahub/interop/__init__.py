"""Converters between deltahub artifacts and other libraries' adapter formats, torch-free.

- `deltahub.interop.adapterhub`: AdapterHub (`adapters`) directories in (publish, load);
  `adapterhub_methods` converts each method's config and weights, `adapterhub_fusion`
  publishes a fusion with its constituents.
- `deltahub.interop.adapterhub_export`: deltahub artifacts out as AdapterHub directories.
- `deltahub.interop.rawtensors`: safetensors files read and written without torch.
"""
