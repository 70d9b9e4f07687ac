"""The local registry: content-addressed blobs plus SQLite metadata."""

from deltahub.registry.refs import Ref, parse_ref
from deltahub.registry.registry import Registry
from deltahub.registry.version import GcReport, Page, VerifyReport, Version

__all__ = ["GcReport", "Page", "Ref", "Registry", "VerifyReport", "Version", "parse_ref"]
