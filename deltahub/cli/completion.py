"""Shell completion of adapter refs (Click's `shell_complete`).

Enable it once per shell (the README says how):

    eval "$(_DELTAHUB_COMPLETE=bash_source deltahub)"     # bash, in ~/.bashrc
    eval "$(_DELTAHUB_COMPLETE=zsh_source deltahub)"      # zsh, in ~/.zshrc
    _DELTAHUB_COMPLETE=fish_source deltahub | source      # fish

A word without `@` completes to adapter names of the local registry; `name@` completes
to that adapter's versions and tags. Completion never fails loudly: an unreadable
registry completes to nothing.
"""

from __future__ import annotations

from typing import Any

MAX_ITEMS = 200
REF_ARGUMENTS = ("ref", "refs", "ref_a", "ref_b")  # the argument names that take a ref


def ref_candidates(incomplete: str, registry: Any = None) -> list[str]:
    """Refs of the local registry that start with `incomplete`."""
    from deltahub.registry import Registry

    registry = registry or Registry()
    if "@" in incomplete:
        name, _, _ = incomplete.partition("@")
        refs = [f"{name}@{v.version}" for v in registry.versions(name, limit=MAX_ITEMS)]
        tags = sorted({t for v in registry.versions(name, limit=MAX_ITEMS) for t in v.tags})
        refs += [f"{name}@{t}" for t in tags]
    else:  # a prefix range on the index of latest versions: fast at any registry size
        rows = registry.db.execute(
            "select full_name from versions where is_latest = 1 and full_name >= ? and full_name < ? "
            "order by full_name limit ?",
            [incomplete, incomplete + "\U0010ffff", MAX_ITEMS],
        ).fetchall()
        refs = [row[0] for row in rows]
    return [r for r in refs if r.startswith(incomplete)]


def complete_refs(ctx: Any, param: Any, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    try:
        return [CompletionItem(r) for r in ref_candidates(incomplete)]
    except Exception:  # a completion must never print a traceback into the shell
        return []
