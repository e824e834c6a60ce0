"""The `moe-reroute` command: one subcommand per module of this package.

A bad input ends the command with one line on stderr and exit status 2, never a traceback;
`--debug` also prints the traceback. Ctrl-C ends it with one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback

from .. import __version__
from . import bench, check, demo, engine, measure, parallel, reference, tune

COMMANDS = [demo, check, reference, measure, tune, bench, parallel, engine]
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
# What a bad input raises: a command's own checks, the library's ValueError/TypeError naming the
# parameter, a file that cannot be read or written, a missing optional dependency.
BAD_INPUT = (ValueError, TypeError, OSError, ImportError)


# The modules each extra installs; a command whose parser sets `needs=(extra, ...)` checks them first.
EXTRAS = {"hf": ("transformers", "safetensors"), "plots": ("matplotlib",), "vllm": ("vllm",)}


def missing_extras(needs) -> list[str]:
    """The extras of `needs` with a module that cannot be found (found, not imported: this is cheap)."""
    return [extra for extra in needs if any(importlib.util.find_spec(m) is None for m in EXTRAS[extra])]


class CommandError(SystemExit):
    """Exit status 2 with `message` (already printed on stderr); `str()` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_BAD_INPUT)
        self.message = message

    def __str__(self) -> str:
        return self.message


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default where its help does not already give one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or action.nargs == 0 or default is None
                or default is argparse.SUPPRESS or default == [] or isinstance(default, bool)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit status 2, as argparse's own), and every option's
    default in its help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(f"{self.prog}: error: {message} (see {self.prog} --help)")


def fail(line: str) -> None:
    line = " ".join(line.split())  # one line, whatever the message held
    print(line, file=sys.stderr)
    raise CommandError(line)


def _message(prog: str, text: str) -> str:
    for prefix in (f"{prog}: error: ", "error: "):
        text = text.removeprefix(prefix)
    return f"{prog}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    from ..progress import quiet_third_party_bars

    quiet_third_party_bars()  # before any library's tqdm is imported: it reads TQDM_DISABLE then
    parser = Parser(prog="moe-reroute", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, also print its traceback")
    parser.add_argument("--version", action="version", version=f"moe-reroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_parsers(sub)
    for command in sub.choices.values():  # --debug also after the command's name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, which names the command and its --help
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for reports
    prog = f"moe-reroute {args.command}"
    missing = missing_extras(getattr(args, "needs", ()))
    if missing:  # before the command prints anything
        modules = ", ".join(m for extra in missing for m in EXTRAS[extra])
        fail(f"{prog}: error: this command needs {modules}: pip install 'moe-reroute[{','.join(missing)}]'")
    try:
        return args.run(args)
    except CommandError:
        raise
    except SystemExit as e:  # a command's own check: SystemExit("error: ...")
        if not isinstance(e.code, str):
            raise
        if args.debug:
            traceback.print_exc()
        fail(_message(prog, e.code))
    except BAD_INPUT as e:
        if args.debug:
            traceback.print_exc()
        fail(_message(prog, str(e) or type(e).__name__))
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"\n{prog}: interrupted; outputs are written complete or not at all", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
