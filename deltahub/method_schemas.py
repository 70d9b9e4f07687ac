"""Config schemas of the non-PEFT methods (bottleneck adapters, fusion, ...).

Torch-free, so the registry can validate any artifact without model code. Each method
registers one checker with `artifact.register_config_checker`.
"""

from __future__ import annotations
