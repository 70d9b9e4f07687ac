"""The hub's list, search and versions routes page like the registry: `limit`, `cursor`.

The body stays a JSON list; the next page's cursor comes in the `X-Next-Cursor` header
(absent on the last page).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deltahub.registry import Registry
from tests.hub_helpers import Hub, lora_dir, start_hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path)


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
    reg = Registry(hub.home)
    art = lora_dir(tmp_path / "art")
    for i in range(5):
        reg.publish(art, name=f"team/a{i}", description="pageable adapter")
    for _ in range(4):
        reg.publish(art, name="team/a0")
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
    Registry(hub.home).publish(lora_dir(tmp_path / "art"), name="team/a")
    headers = {"Authorization": f"Bearer {hub.tokens['read']}"}
    for path, params in (
        ("/v1/adapters", {"cursor": "garbage"}),
        ("/v1/adapters", {"q": "a", "cursor": "garbage"}),
        ("/v1/adapters/team/a/versions", {"cursor": "garbage"}),
        ("/v1/adapters/team/a/versions", {"limit": "0"}),
    ):
        r = httpx.get(f"{hub.url}{path}", params=params, headers=headers)
        assert r.status_code == 400 and "error" in r.json(), (path, params, r.text)
