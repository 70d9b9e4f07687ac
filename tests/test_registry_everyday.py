"""Issue 15 on the registry: pinned parents survive `rm`, and a read-only home still reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.errors import InUse, ReadOnly
from deltahub.registry import Registry
from tests.test_artifact import make_good
from tests.test_registry_scale import old_schema_home

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return make_good(tmp_path / "art")


def family(reg: Registry, art: Path) -> tuple:
    parent = reg.publish(art, name="base-task")
    child = reg.publish(art, name="fused", parents=[{"ref": parent.ref, "digest": parent.digest}])
    return parent, child


# item 6 ------------------------------------------------------------------------------------


def test_rm_refuses_a_pinned_parent_unless_forced_and_verify_reports_the_dangling_pin(art: Path) -> None:
    reg = Registry()
    parent, child = family(reg, art)
    assert [d.ref for d in reg.dependents(parent)] == [child.ref]
    with pytest.raises(InUse, match="fused@1"):
        reg.remove(parent.ref)
    result = CliRunner().invoke(cli, ["rm", parent.ref, "--yes"])
    assert result.exit_code == InUse.exit_code and "--force" in result.output
    assert len(result.output.strip().splitlines()) == 1 and reg.resolve(parent.ref)
    assert reg.verify().ok
    assert CliRunner().invoke(cli, ["rm", parent.ref, "--yes", "--force"]).exit_code == 0
    problems = reg.verify().problems
    assert problems == [
        f"fused@1: pins parent {parent.digest}, which is not in this registry (it cannot load)"
    ]
    reg.remove(child.ref)  # a pinning version itself goes freely
    assert reg.verify().ok


def test_pins_of_a_registry_made_before_them_are_found_after_migrating(art: Path, tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    parent, _ = family(source, art)
    old_schema_home(tmp_path / "old", source)
    with pytest.raises(InUse):
        Registry(tmp_path / "old").remove(parent.ref)


# item 2 ------------------------------------------------------------------------------------


def read_only_run(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with `home` bind-mounted read-only (a private mount namespace: needs root)."""
    script = f"from deltahub.cli.main import cli; cli({list(args)!r})"
    shell = 'mount --bind -o ro "$H" "$H" && exec "$PY" -c "$S"'
    env = {**os.environ, "H": str(home), "PY": sys.executable, "S": script, "PYTHONPATH": str(ROOT)}
    env["DELTAHUB_HOME"] = str(home)
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, env=env, timeout=120
    )


def can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    test = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{probe}" "{probe}" && ! touch "{probe}/x"'],
        capture_output=True,
    )
    return test.returncode == 0


def test_a_read_only_home_reads_and_refuses_writes_in_one_line(art: Path, tmp_path: Path) -> None:
    if not can_mount_read_only(tmp_path):
        pytest.skip("needs a private mount namespace (root, unshare) to make a read-only home")
    home = tmp_path / "home"
    reg = Registry(home)
    v = reg.publish(art, name="team/ro", description="read only")
    reg.close()
    listed = read_only_run(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [d["ref"] for d in json.loads(listed.stdout)] == ["team/ro@1"]
    for args, expect in (
        (["show", "team/ro"], "team/ro@1"),
        (["search", "read"], "team/ro"),
        (["show", "team/ro", "--versions"], "team/ro"),
        (["verify"], "verified 1 versions"),
    ):
        result = read_only_run(home, *args)
        assert result.returncode == 0 and expect in result.stdout, (args, result.stdout, result.stderr)
    exported = read_only_run(home, "export", "team/ro", str(tmp_path / "out"))
    assert exported.returncode == 0 and (tmp_path / "out" / "adapter_model.safetensors").exists()
    for args in (
        ["publish", str(art), "--name", "team/ro"],
        ["tag", "team/ro@1", "prod"],
        ["rm", v.ref, "--yes"],
    ):
        result = read_only_run(home, *args)
        assert result.returncode == ReadOnly.exit_code, (args, result.stderr)
        assert "read-only" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert Registry(home).resolve("team/ro").version == "1"  # nothing changed


# item 8 (the registry's part) --------------------------------------------------------------


def test_a_search_of_only_quotes_and_a_home_that_cannot_be_made_are_one_line(
    art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Registry().publish(art, name="q", description="quoted")
    assert Registry().search('"') == [] and Registry().search('" "') == []
    assert [v.full_name for v in Registry().search('"quoted')] == ["q"]
    result = CliRunner().invoke(cli, ["search", '"'])
    assert result.exit_code == 0 and "nothing matches" in result.output
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DELTAHUB_HOME", str(blocker / "home"))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "DELTAHUB_HOME" in result.output and len(result.output.strip().splitlines()) == 1
