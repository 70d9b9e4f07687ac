"""The local registry: content-addressed blobs plus SQLite metadata."""

from deltahub.registry.refs import Ref, parse_ref
from deltahub.registry.registry import GcReport, Registry, VerifyReport, Version

__all__ = ["GcReport", "Ref", "Registry", "VerifyReport", "Version", "parse_ref"]
