"""The hub's web pages, driven in a real headless browser against a real `deltahub serve`.

Playwright for Python drives Debian's chromium (`apt-get install -y chromium`; Playwright's
own browser download is not used). Where either is missing every test here is skipped
with the reason. Each page is saved as a screenshot under the module's tmp dir
(`screens/`), whose path the tests print.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deltahub.diffing import diff
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry
from tests.hub_helpers import lora_dir
from tests.test_plots import build_fusion

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
CHROMIUM = (
    os.environ.get("DELTAHUB_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
if not CHROMIUM:
    pytest.skip(
        "no chromium executable (Debian: apt-get install -y chromium; or set DELTAHUB_TEST_CHROMIUM)",
        allow_module_level=True,
    )
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
XSS = '<script>window.__pwned = 1; alert("xss")</script><img src=x onerror="alert(2)"> & friends'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deltahub() -> list[str]:
    exe = Path(sys.executable).parent / "deltahub"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from deltahub.cli.main import cli; cli()"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A registry (LoRA versions, a fusion, a private namespace, a hostile description),
    served by `deltahub serve` in a subprocess on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("pages")
    home = tmp / "home"
    reg = Registry(home)
    fused = build_fusion(reg, tmp)
    for seed, acc in ((0, 0.5), (1, 0.75), (2, 0.625)):
        reg.publish(
            lora_dir(tmp / f"alpha{seed}", seed, layers=3), "team/alpha", metrics={"accuracy": acc},
            description="sentiment of short reviews", task="sentiment",
        )  # fmt: skip
    reg.tag("team/alpha@2", "prod")
    reg.publish(lora_dir(tmp / "beta", 5), "secret/beta", description="the secret project")
    reg.publish(lora_dir(tmp / "xss", 6), "team/xss", description=XSS, task=XSS[:40])
    names = sorted(["team/colors", "team/animals", "team/fz", "team/alpha", "secret/beta", "team/xss"])
    store = TokenStore(home)
    tokens = {"read": store.create("read")[0], "team": store.create("read", namespace="team")[0]}
    store.close()

    port = _free_port()
    log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "DELTAHUB_HOME": str(home)}
    proc = subprocess.Popen(
        [*_deltahub(), "serve", "--home", str(home), "--port", str(port), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/ui/login", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"deltahub serve did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.25)
        screens = tmp / "screens"
        screens.mkdir()
        print(f"\nscreenshots: {screens}")
        yield {
            "home": home,
            "url": url,
            "registry": reg,
            "fused": fused,
            "tokens": tokens,
            "names": names,
            "screens": screens,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A page in its own browser context, recording dialogs and console errors."""

    def __init__(self, browser: Any, site: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.site = site
        self.context = browser.new_context(
            extra_http_headers=headers or {}, viewport={"width": 1280, "height": 900}
        )
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.dialogs: list[str] = []
        self.console: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))

    def go(self, path: str) -> Any:
        return self.page.goto(self.site["url"] + path)

    def shot(self, name: str) -> Path:
        path = self.site["screens"] / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def login(self, token: str) -> None:
        self.go("/ui/login")
        self.page.fill("input[name=token]", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/ui/")

    def listed(self, expected: list[str]) -> list[str]:
        """The adapters the index lists, once as many as `expected` are there (auto-waiting)."""
        links = self.page.locator("a.adapter-link")
        sync_api.expect(links).to_have_count(len(expected))
        return sorted(links.all_inner_texts())

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser: Any, site: dict[str, Any]) -> Iterator[Tab]:
    t = Tab(browser, site)
    yield t
    t.close()


def test_private_namespaces_are_invisible_without_a_token_and_visible_with_one(
    browser: Any, site: dict[str, Any], tab: Tab
) -> None:
    response = tab.go("/ui/")
    assert response.status == 401
    assert tab.page.locator("input[name=token]").is_visible()
    html = tab.page.content()
    assert all(name not in html for name in site["names"])
    tab.shot("login")

    tab.login(site["tokens"]["team"])  # a token limited to namespace "team"
    team = [n for n in site["names"] if n.startswith("team/")]
    assert tab.listed(team) == team
    assert "secret/beta" not in tab.page.content()
    cookie = next(c for c in tab.context.cookies() if c["name"] == "deltahub_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert tab.go("/ui/a/secret/beta").status == 403
    tab.shot("forbidden")

    everyone = Tab(browser, site)
    try:
        everyone.login(site["tokens"]["read"])
        assert everyone.listed(site["names"]) == site["names"]
    finally:
        everyone.close()
    # The token as a bearer header works too, with no login.
    header = Tab(browser, site, headers={"Authorization": f"Bearer {site['tokens']['read']}"})
    try:
        assert header.go("/ui/a/secret/beta").status == 200
        assert "the secret project" in header.page.content()
    finally:
        header.close()
    bad = Tab(browser, site, headers={"Authorization": "Bearer dh_not-a-real-token"})
    try:
        assert bad.go("/ui/").status == 401
    finally:
        bad.close()


def test_index_lists_what_was_published_and_search_and_filters_narrow_it(
    site: dict[str, Any], tab: Tab
) -> None:
    tab.login(site["tokens"]["read"])
    assert tab.listed(site["names"]) == site["names"]
    tab.shot("index")
    tab.page.fill("input[name=q]", "alpha")
    tab.page.click("form[role=search] button.primary")  # (the header has a sign-out button)
    tab.page.wait_for_url("**q=alpha**")
    assert tab.listed(["team/alpha"]) == ["team/alpha"]
    tab.shot("index-search")
    tab.go("/ui/")
    tab.page.select_option("select[name=method]", "fusion")
    tab.page.click("form[role=search] button.primary")  # (the header has a sign-out button)
    tab.page.wait_for_url("**method=fusion**")
    assert tab.listed(["team/fz"]) == ["team/fz"]
    tab.go("/ui/?tag=prod")
    assert tab.listed(["team/alpha"]) == ["team/alpha"]
    tab.go("/ui/?namespace=secret")
    assert tab.listed(["secret/beta"]) == ["secret/beta"]


def test_adapter_page_shows_versions_tags_metric_chart_and_card(site: dict[str, Any], tab: Tab) -> None:
    tab.login(site["tokens"]["read"])
    tab.go("/ui/a/team/alpha")
    rows = tab.page.locator("#versions tbody tr")
    assert rows.count() == 3
    points = tab.page.locator("#metric-chart circle.point")
    assert [float(points.nth(i).get_attribute("data-value")) for i in range(3)] == [0.5, 0.75, 0.625]
    assert "prod → 2" in tab.page.locator("body").inner_text()
    card = tab.page.locator("#card").inner_text()
    assert (
        card.startswith("---\nlibrary_name: peft\nbase_model: tiny-llama")
        and "deltahub pull team/alpha@3" in card
    )
    tab.shot("adapter")


def test_version_page_has_files_config_lineage_and_commands(site: dict[str, Any], tab: Tab) -> None:
    reg: Registry = site["registry"]
    v = reg.resolve("team/alpha@2")
    tab.login(site["tokens"]["read"])
    tab.go("/ui/a/team/alpha/v/prod")
    assert tab.page.locator("#digest").inner_text() == v.digest
    files = tab.page.locator("#files").inner_text()
    assert all(name in files and digest in files for name, digest in v.files.items())
    assert '"peft_type": "LORA"' in tab.page.locator("#config").inner_text()
    commands = tab.page.locator("#commands").inner_text()
    assert (
        f"deltahub pull team/alpha@{v.digest}" in commands
        and f"deltahub remote add origin {site['url']}" in commands
    )
    assert "vllm serve tiny-llama --enable-lora" in commands
    tab.shot("version")


def test_fusion_page_links_reach_its_constituents(site: dict[str, Any], tab: Tab) -> None:
    reg: Registry = site["registry"]
    fz = site["fused"]["fusion"]
    data = reg.manifest(fz).extra["fusion"]
    tab.login(site["tokens"]["read"])
    tab.go("/ui/a/team/fz/v/1")
    assert tab.page.locator("a.parent-link").count() == 2  # lineage: both constituents, pinned
    tab.page.click("#fusion-link")
    tab.page.wait_for_url("**/fusion")
    cells = tab.page.locator("#attention-heatmap rect.cell")
    assert cells.count() == len(data["attention_per_site"]) * 2
    shown = sorted(cells.nth(i).get_attribute("data-value") for i in range(cells.count()))
    assert shown == sorted(f"{w:.2f}" for row in data["attention_per_site"].values() for w in row.values())
    tab.shot("fusion")
    links = tab.page.locator("a.constituent-link")
    assert links.count() == 2
    for i, c in enumerate(data["constituents"]):
        tab.page.locator("a.constituent-link").nth(i).click()
        tab.page.wait_for_load_state()
        assert tab.page.locator("#digest").inner_text() == c["digest"]
        assert tab.page.locator("h1").inner_text() == c["ref"]
        # ... whose lineage links back to the fusion (a child pinning it).
        assert tab.page.locator("a.child-link").inner_text() == fz.ref
        if i == 0:
            tab.shot("constituent")
        tab.page.go_back()


def test_diff_page_shows_the_changed_modules(site: dict[str, Any], tab: Tab) -> None:
    report = diff("team/alpha@1", "team/alpha@3", registry=site["registry"])
    tab.login(site["tokens"]["read"])
    tab.go("/ui/a/team/alpha")
    tab.page.locator("a.diff-link").nth(1).click()  # "diff with 2" on version 3
    tab.page.wait_for_url("**/ui/diff**")
    tab.go("/ui/diff?a=team/alpha@1&b=team/alpha@3")
    assert tab.page.locator("#verdict").inner_text() == report.verdict == "changed"
    shown = tab.page.locator("#modules tr.module-row td:first-child").all_inner_texts()
    assert sorted(shown) == sorted(m.module for m in report.changed_modules) and len(shown) == 6
    bars = tab.page.locator("#relative-chart rect.bar")
    values = sorted(float(bars.nth(i).get_attribute("data-value")) for i in range(bars.count()))
    assert values == sorted(m.relative_change for m in report.modules)
    tab.shot("diff")


def test_user_text_holding_script_is_shown_as_text(site: dict[str, Any], tab: Tab) -> None:
    tab.login(site["tokens"]["read"])
    for path in (
        "/ui/",
        "/ui/a/team/xss",
        "/ui/a/team/xss/v/1",
        "/ui/?q=%22%3E%3Cscript%3Ealert(3)%3C/script%3E",
    ):
        tab.go(path)
        assert tab.page.locator("script").count() == 0, path
        assert tab.page.locator("img").count() == 0, path
        assert tab.page.evaluate("() => window.__pwned") is None
    tab.go("/ui/a/team/xss")
    assert XSS in tab.page.locator("main").inner_text()  # the literal characters, as text
    tab.shot("xss")
    assert tab.dialogs == []
    assert not [m for m in tab.console if "xss" in m or "pwned" in m]


def _session_cookies(tab: Tab) -> list[dict[str, Any]]:
    return [c for c in tab.context.cookies() if c["name"] == "deltahub_token"]


def test_sign_out_and_revocation_end_the_session(site: dict[str, Any], tab: Tab) -> None:
    tab.login(site["tokens"]["read"])
    tab.page.click("header button[type=submit]")  # sign out
    tab.page.wait_for_url("**/ui/login")
    assert _session_cookies(tab) == [] and tab.go("/ui/").status == 401

    store = TokenStore(site["home"])
    token, info = store.create("read")
    tab.login(token)
    assert tab.go("/ui/a/team/alpha").status == 200
    store.revoke(info.id)  # takes effect at once, as on the API
    store.close()
    assert tab.go("/ui/a/team/alpha").status == 401
    assert _session_cookies(tab) == []  # the dead token is not kept
