"""argparse types shared by the benchmark scripts: a bad value is one `error: argument --flag: ...` line (exit 2)
before anything is built or measured, not a traceback minutes into a run."""

from __future__ import annotations

import argparse
import difflib
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small: give a whole number >= {low}")
        return value

    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be a number > 0")
    return value


def comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    """argparse type: a comma-separated list (at least one item), each item parsed by `item`."""

    def parse(text: str) -> list:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one comma-separated value")
        return [item(part) for part in items]

    return parse


def names(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names from `choices`, each once, in the order given."""
    choices = list(choices)

    def name(text: str) -> str:
        if text not in choices:
            close = difflib.get_close_matches(text, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {','.join(choices)}{hint}")
        return text

    listed = comma_list(name)
    return lambda text: list(dict.fromkeys(listed(text)))


def model_dir(text: str) -> str:
    """argparse type: a saved model's directory (config.json inside)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such directory; pass a saved model's folder")
    if not Path(text, "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no config.json there; pass a saved model's folder")
    return text


def executable(text: str) -> str:
    """argparse type: a program path, or a name on PATH."""
    if shutil.which(text) is None:
        raise argparse.ArgumentTypeError(
            f"{text}: no such executable (give an interpreter's path, e.g. DIR/bin/python)"
        )
    return text


def fill_unset(args: argparse.Namespace, defaults: dict) -> None:
    """Flags left out (None) take `defaults` (e.g. the --quick sizes); a value given on the command line stays."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
