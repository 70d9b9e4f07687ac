"""Shell completion completes refs: adapter names, then `name@` versions and tags."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from deltahub.cli.completion import ref_candidates
from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.test_artifact import make_good


def _complete(words: str) -> list[str]:
    """What bash completion offers for the last word of `deltahub <words>`."""
    args = ["deltahub", *words.split(" ")]
    env = {
        "_DELTAHUB_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(args),
        "COMP_CWORD": str(len(args) - 1),
    }
    result = CliRunner().invoke(cli, [], env=env, prog_name="deltahub")
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line.startswith("plain,")]


def test_refs_complete_in_every_ref_argument(tmp_path: Path) -> None:
    art = make_good(tmp_path / "art")
    registry = Registry()
    registry.publish(art, "team/sentiment", tags=["prod"])
    registry.publish(art, "team/sentiment")
    registry.publish(art, "team/topic")
    registry.publish(art, "other")
    assert ref_candidates("team/") == ["team/sentiment", "team/topic"]
    assert sorted(ref_candidates("team/sentiment@")) == sorted(
        ["team/sentiment@1", "team/sentiment@2", "team/sentiment@latest", "team/sentiment@prod"]
    )
    assert _complete("show team/s") == ["team/sentiment"]
    assert _complete("run --base x te") == ["team/sentiment", "team/topic"]
    assert "team/sentiment@prod" in _complete("diff team/sentiment@")
    assert _complete("rm o") == ["other"]


def test_completion_never_fails_loudly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env_home = str(blocker / "home")  # a home that cannot be created
    args = ["deltahub", "show", "x"]
    env = {
        "_DELTAHUB_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(args),
        "COMP_CWORD": "2",
        "DELTAHUB_HOME": env_home,
    }
    result = CliRunner().invoke(cli, [], env=env, prog_name="deltahub")
    assert result.exit_code == 0 and "Traceback" not in result.output
