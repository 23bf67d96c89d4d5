"""The project's own error type, and how command-line tools show it.

Every problem a user can cause or meet (a bad config value, a corrupt or truncated file, a
checkpoint of another model, a tokenizer that cannot be loaded offline) raises a subclass of
`PretrainError` whose message names the file or the field and says what was expected. A bug in
the code raises anything else, with its traceback. The specific errors keep the built-in class
they always had as a second base (ShardError is still a ValueError, AtomicWriteError an
OSError), so existing `except ValueError` code keeps working.

    raise FileFormatError(path, "a JSON object with a 'train' table", "got a list")
    ...
    if __name__ == "__main__":
        run_cli(main)      # a PretrainError prints as one "error: ..." line, exit status 2
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class PretrainError(Exception):
    """Base of every error a user can fix: bad input, bad files, refused settings."""


class FileFormatError(PretrainError, ValueError):
    """A file that exists but is not what it should be (corrupt, truncated, another format)."""

    def __init__(self, path: str | Path, expected: str, detail: str = ""):
        self.path, self.expected, self.detail = Path(path), expected, detail
        super().__init__(f"{path}: expected {expected}" + (f"; {detail}" if detail else ""))


class MissingFileError(PretrainError, FileNotFoundError):
    """A file or directory that should be there and is not; the message says how to make it."""


def read_json(path: str | Path, expected: str = "a JSON object") -> Any:
    """The parsed JSON of `path`; a missing, unreadable, non-UTF-8 or malformed file raises
    MissingFileError / FileFormatError naming the file and `expected` (what it should hold)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path} does not exist (expected {expected})") from None
    except IsADirectoryError:
        raise FileFormatError(path, expected, "it is a directory") from None
    except OSError as e:
        raise FileFormatError(path, expected, f"unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(path, expected, f"invalid UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = f"not valid JSON ({e.msg}, line {e.lineno})" if isinstance(e, json.JSONDecodeError) \
            else "nested too deeply"
        raise FileFormatError(path, expected, detail) from None


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI's main(): a PretrainError becomes one line on stderr and exit status 2, no
    traceback (anything else is a bug and keeps its traceback)."""
    try:
        main()
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
