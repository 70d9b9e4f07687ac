"""Fusion artifacts: building the config and manifest, and loading the pinned constituents.

A fusion artifact holds only its own parameters (Q, K, V per site, and a task head when
there is one). Its constituents are other registry versions, pinned by digest twice: in
the manifest's `parents` (role "constituent"; the registry refuses to publish a parent
it cannot resolve) and in `extra["fusion"]["constituents"]`, which also records the name
each constituent has inside the fusion (`config["adapters"]`).

Loading (`AdaptedModel.load("my-fusion")` calls `load_constituents` first) loads each
constituent *by digest*, so a moved tag or a newer version never changes what a fusion
computes; a missing constituent or one whose digest differs is a clear error.
"""

from __future__ import annotations

from typing import Any

from deltahub import artifact as af
from deltahub.errors import IntegrityError, NotFound
from deltahub.methods.fusion.schema import FusionConfig

CONSTITUENT_ROLE = "constituent"


def constituents_of(manifest: af.Manifest | None) -> list[dict[str, str]]:
    """[{"name", "ref", "digest"}] of a fusion manifest, in the config's adapter order."""
    if manifest is None:
        return []
    listed = (manifest.extra.get("fusion") or {}).get("constituents") or []
    if listed:
        return [dict(c) for c in listed]
    # A manifest written by hand may have only the parents: name = the ref's name.
    return [
        {"name": p.ref.split("@", 1)[0], "ref": p.ref, "digest": p.digest}
        for p in manifest.parents
        if p.role == CONSTITUENT_ROLE
    ]


def load_constituents(model: Any, artifact: af.Artifact, registry: Any = None) -> list[str]:
    """Make every constituent of a fusion resident in `model` at its pinned digest."""
    cfg = FusionConfig.from_dict(artifact.config)
    pinned = {c["name"]: c for c in constituents_of(artifact.manifest)}
    resident_digests: dict[str, str | None] = getattr(model, "_digests", {})
    for name in cfg.adapters:
        want = pinned.get(name)
        if name in model.adapters:
            have = resident_digests.get(name)
            if want is None or have == want["digest"]:
                continue
            raise IntegrityError(
                f"adapter {name!r} is loaded as {have or 'an unpublished adapter'}, but the fusion pins "
                f"{want['ref']} ({want['digest']}); unload({name!r}) first"
            )
        if want is None:
            raise NotFound(
                f"the fusion uses adapter {name!r} but does not pin it (no manifest entry); "
                f"load it into the model first"
            )
        if registry is None:
            from deltahub.registry import Registry

            registry = model.registry = Registry()
        try:
            version = registry.by_digest(want["digest"])
        except NotFound:
            try:
                other = registry.resolve(want["ref"])
            except NotFound:
                raise NotFound(
                    f"the fusion needs constituent {want['ref']} ({want['digest']}), which is not in the "
                    f"registry at {registry.home}; pull or publish it first"
                ) from None
            raise IntegrityError(
                f"constituent {want['ref']} is {other.digest} in this registry, but the fusion pins "
                f"{want['digest']}; pull the pinned version (deltahub pull {want['ref'].split('@')[0]}@{want['digest']})"
            ) from None
        model.load(f"{version.full_name}@{version.digest}", name=name)
    return list(cfg.adapters)
