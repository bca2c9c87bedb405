"""The `featopt` command, built from the command registry (`featopt.commands.registry`).

Every command's flags are its config dataclass' fields (help: each field's docstring); `--config`
reads a YAML recipe of them and `--print_config` shows the resolved settings (Lightning's
jsonargparse). Bad input ends in one sentence on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import fields
from typing import get_type_hints

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from featopt.commands.fields import check_config, default_of, field_docs, flag_of
from featopt.commands.registry import COMMANDS, GROUPS, Command
from featopt.errors import FeatoptError


class _Parser(ArgumentParser):
    """jsonargparse's parser, but a bad flag ends in one line on stderr and exit status 2."""

    def error(self, message, ex=None):
        sys.stderr.write(f"featopt: error: {' '.join(str(message).split())} (see --help)\n")
        sys.exit(2)


def add_config_arguments(parser: ArgumentParser, config_cls) -> None:
    """One flag per field of a config dataclass; booleans get `--x/--no_x`; a field whose metadata
    names a `repeat` flag (`--text`) takes that flag any number of times, each adding an item."""
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe with any of these options")
    hints, docs = get_type_hints(config_cls), field_docs(config_cls)
    repeated = {f.metadata["repeat"]: f.name for f in fields(config_cls) if "repeat" in f.metadata}
    for f in fields(config_cls):
        flag = flag_of(f.name)
        if flag[2:] in repeated and repeated[flag[2:]] != f.name:
            continue  # the repeatable flag of another field takes this name
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=ActionYesNo, default=default_of(f), help=docs.get(f.name, ""))
        else:
            parser.add_argument(flag, dest=f.name, type=hints[f.name], default=default_of(f), help=docs.get(f.name, ""))
    for flag, name in repeated.items():
        parser.add_argument(f"--{flag}", dest=f"{name}_repeated", action="append", default=None,
                            help=f"{docs.get(name, '')} (repeat --{flag} for more)")


def build_parser() -> ArgumentParser:
    parser = _Parser(prog="featopt", description="Find the inputs that make a feature of a language model fire.")
    sub = parser.add_subcommands(dest="command", required=True)
    nested = {}  # group -> its subcommands, in the registry's order
    for command in COMMANDS:
        if command.group and command.group not in nested:
            group = _Parser(description=GROUPS[command.group])
            sub.add_subcommand(command.group, group, help=GROUPS[command.group])
            # jsonargparse wants nested subcommands added after their parent is attached.
            nested[command.group] = group.add_subcommands(dest="task", required=True)
        leaf = _Parser(description=command.summary)
        add_config_arguments(leaf, command.config)
        (nested[command.group] if command.group else sub).add_subcommand(command.leaf, leaf, help=command.summary)
    return parser


def command_of(args) -> tuple[Command, object]:
    """The chosen command of parsed `args` and its namespace."""
    if args.command in GROUPS:
        task = args[args.command].task
        return next(c for c in COMMANDS if c.name == f"{args.command} {task}"), args[args.command][task]
    return next(c for c in COMMANDS if c.name == args.command), args[args.command]


def config_from(command: Command, namespace):
    """The command's config from its parsed flags (a repeated flag's items added to its field)."""
    values = {}
    for f in fields(command.config):
        values[f.name] = namespace.get(f.name, default_of(f))  # a field whose flag a repeat flag took: its default
        extra = namespace.get(f"{f.name}_repeated") if "repeat" in f.metadata else None
        if extra:
            values[f.name] = list(extra) + list(values[f.name] or [])
    return command.config(**values)


def _quiet_lightning() -> None:
    # Lightning's start-up notices (GPU/TPU availability, tips) would bury the results table.
    # Its loggers get their level when it is imported, so import it first.
    import lightning.pytorch  # noqa: F401

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # "Token indices sequence length is longer than ...": featopt checks input lengths against the
    # model itself and answers a too-long text with its own one sentence.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from featopt.interrupt import Interrupted, raising_on_signals

    try:
        with raising_on_signals():
            return _main(argv)
    except Interrupted as interrupted:  # Ctrl-C or kill -TERM: every writer has cleaned up on the way here
        hint = interrupted.hint or "run it again"
        print(f"featopt: interrupted by {interrupted.name}; {hint}.", file=sys.stderr)
        return interrupted.exit_status


def _main(argv: list[str] | None) -> int:
    _quiet_lightning()
    args = build_parser().parse_args(argv)  # exits 2 with one message on malformed flags
    command, namespace = command_of(args)
    try:
        config = config_from(command, namespace)
        check_config(config)
        result = command.run(config)
        if result.rank_zero:
            if not result.printed:
                print(result.table())
            print(f"results: {result.path}")
    except FeatoptError as error:  # one line, however the message was built
        print(f"featopt: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
