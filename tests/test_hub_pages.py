"""The hub's list, search and versions routes page like the registry: `limit`, `cursor`.

The body stays a JSON list; the next page's cursor comes in the `X-Next-Cursor` header
(absent on the last page).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deltahub.hub.client import HubClient, push
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, lora_dir, start_hub


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, request.param)


def publish_all(hub: Hub, tmp_path: Path, names: list[str], description: str = "pageable adapter") -> None:
    """Publish `names` in order (one version each, distinct weights) and push each version,
    so the hub's own store (SQLite or PostgreSQL) allocates and pages them."""
    reg = Registry(tmp_path / "client")
    writer = HubClient(hub.url, hub.tokens["write"])
    for i, name in enumerate(names):
        v = reg.publish(lora_dir(tmp_path / f"art{i}", seed=i), name=name, description=description)
        push(v.ref, writer, reg)


def follow(hub: Hub, path: str, params: dict[str, str]) -> tuple[list[str], int]:
    refs: list[str] = []
    pages, cursor = 0, None
    headers = {"Authorization": f"Bearer {hub.tokens['read']}"}
    while True:
        r = httpx.get(
            f"{hub.url}{path}", params={**params, **({"cursor": cursor} if cursor else {})}, headers=headers
        )
        assert r.status_code == 200, r.text
        refs += [d["ref"] for d in r.json()]
        pages += 1
        cursor = r.headers.get("x-next-cursor")
        if cursor is None:
            return refs, pages
        assert pages < 20


def test_list_search_and_versions_page_with_a_cursor(hub: Hub, tmp_path: Path) -> None:
    publish_all(hub, tmp_path, [f"team/a{i}" for i in range(5)] + ["team/a0"] * 4)
    assert follow(hub, "/v1/adapters", {"limit": "2"}) == (
        ["team/a0@5", "team/a1@1", "team/a2@1", "team/a3@1", "team/a4@1"],
        3,
    )
    refs, pages = follow(hub, "/v1/adapters", {"q": "pageable", "limit": "2"})
    assert sorted(refs) == ["team/a0@5", "team/a1@1", "team/a2@1", "team/a3@1", "team/a4@1"] and pages == 3
    assert follow(hub, "/v1/adapters/team/a0/versions", {"limit": "2"}) == (
        [f"team/a0@{i}" for i in range(1, 6)],
        3,
    )
    assert follow(hub, "/v1/adapters/team/a0/versions", {}) == ([f"team/a0@{i}" for i in range(1, 6)], 1)


def test_a_bad_cursor_or_limit_is_a_400(hub: Hub, tmp_path: Path) -> None:
    publish_all(hub, tmp_path, ["team/a"])
    headers = {"Authorization": f"Bearer {hub.tokens['read']}"}
    for path, params in (
        ("/v1/adapters", {"cursor": "garbage"}),
        ("/v1/adapters", {"q": "a", "cursor": "garbage"}),
        ("/v1/adapters/team/a/versions", {"cursor": "garbage"}),
        ("/v1/adapters/team/a/versions", {"limit": "0"}),
    ):
        r = httpx.get(f"{hub.url}{path}", params=params, headers=headers)
        assert r.status_code == 400 and "error" in r.json(), (path, params, r.text)
