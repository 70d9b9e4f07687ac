"""The `deltahub` command: a Click group; each module in COMMAND_MODULES adds commands."""

from __future__ import annotations

import importlib
import logging
import os

import click

from deltahub import __version__

# One line per command module; each exposes `register(cli)`.
COMMAND_MODULES = [
    "deltahub.cli.registry_cmds",
    "deltahub.cli.diff_cmd",
    "deltahub.cli.merge_cmd",
    "deltahub.cli.hub_cmds",
    "deltahub.cli.train_cmds",
    "deltahub.cli.compose_cmds",
    "deltahub.cli.eval_cmd",
    "deltahub.cli.account_cmds",
    "deltahub.cli.doctor_cmd",
    "deltahub.cli.quickstart_cmd",
    "deltahub.cli.serving_cmds",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deltahub")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="DELTAHUB_HOME",
    help="Registry home (default $DELTAHUB_HOME, else ~/.deltahub).",
)
def cli(home: str | None) -> None:
    """deltahub: publish, pull, activate, compose, fuse and diff adapters."""
    # transformers draws a bar for every weight load; our commands draw their own progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers imports bitsandbytes, which warns that an optional CPU kernel package
    # (`kernels`) is absent; its exact fallback path is what we use anyway.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if home:
        os.environ["DELTAHUB_HOME"] = home


for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(cli)


def _complete_ref_arguments(group: click.Group) -> None:
    """Every REF argument completes registry refs in the shell (see deltahub.cli.completion).

    `pull` is left out: its refs name what a remote has, not the local registry.
    """
    from deltahub.cli.completion import REF_ARGUMENTS, complete_refs

    for name, command in group.commands.items():
        for param in command.params:
            if isinstance(param, click.Argument) and param.name in REF_ARGUMENTS and name != "pull":
                param._custom_shell_complete = complete_refs


_complete_ref_arguments(cli)
