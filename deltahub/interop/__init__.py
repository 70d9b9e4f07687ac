"""Converters between deltahub artifacts and other libraries' adapter formats, torch-free.

- `deltahub.interop.adapterhub`: AdapterHub (`adapters`) directories in (publish, load).
- `deltahub.interop.adapterhub_export`: deltahub artifacts out as AdapterHub directories.
- `deltahub.interop.rawtensors`: safetensors files read and written without torch.
"""
