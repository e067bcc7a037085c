"""Shell text inside containers and Dockerfile RUN lines: split like sh, find pip and rm.

Not a shell parser: enough to find `pip install` (its names, --target, --upgrade) and
`rm -rf` among the commands of an initContainer script, with the file line of each.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from builder.checks.model import Command, Container, PipInstall, Where


def scalar_lines(value: str, start: int, raw: Sequence[str]) -> list[tuple[str, int]]:
    """Each physical line of a YAML scalar with its 1-based line in the file (best effort).

    A literal block's lines are found verbatim in the file after the item's own line; a quoted
    scalar with escapes is not, and its lines all get the item's line.
    """
    out: list[tuple[str, int]] = []
    cursor = start
    for piece in value.split("\n"):
        needle = piece.strip()
        line = start
        if needle:
            for index in range(cursor, min(len(raw), cursor + 2000)):
                if needle in raw[index]:
                    line, cursor = index, index + 1
                    break
        out.append((piece, line + 1))
    return out


Pieces = tuple[tuple[str, int], ...]


def logical_lines(
    physical: list[tuple[str, int]], *, dockerfile: bool = False
) -> Iterator[tuple[str, Pieces]]:
    """Join backslash continuations; each logical line keeps its physical lines and numbers.

    Inside a Dockerfile continuation, comment lines and empty lines are dropped (and the
    instruction goes on), as Docker's parser does.
    """
    text = ""
    pieces: list[tuple[str, int]] = []
    for piece, line in physical:
        if dockerfile and pieces and (not piece.strip() or piece.lstrip().startswith("#")):
            continue
        pieces.append((piece, line))
        if piece.rstrip().endswith("\\"):
            text += piece.rstrip()[:-1] + " "
            continue
        text += piece
        yield text, tuple(pieces)
        text = ""
        pieces = []
    if pieces:
        yield text, tuple(pieces)


_OPERATOR = re.compile(r"^[;&|()]+$")


_REDIRECT = re.compile(r"^[<>]+&?$")


_PREFIX_WORDS = {"then", "do", "else", "elif", "if", "while", "until", "!", "time", "exec", "sudo"}


def shell_commands(text: str) -> list[list[str]]:
    """Simple commands of one shell line: words split like sh, at ; && || | and redirections."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # an unclosed quote: fall back to words
        tokens = text.split()
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
            continue
        if _OPERATOR.match(token):
            commands.append([])
            continue
        if _REDIRECT.match(token):
            if commands[-1] and commands[-1][-1].isdigit():
                commands[-1].pop()
            skip_next = True
            continue
        commands[-1].append(token)
    cleaned = []
    for words in commands:
        while words and (words[0] in _PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[0])):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def commands_of(text: str, pieces: Pieces, display: str) -> list[Command]:
    where = Where(display, pieces[0][1])
    return [Command(tuple(words), where, pieces) for words in shell_commands(text)]


_PIP_VALUE_OPTIONS = {
    "-t", "--target", "-i", "--index-url", "--extra-index-url", "-f", "--find-links",
    "-r", "--requirement", "-c", "--constraint", "--trusted-host", "--cache-dir",
    "--platform", "--python-version", "--implementation", "--abi", "--root", "--prefix",
    "--src", "-e", "--editable", "--upgrade-strategy", "--progress-bar", "--log", "--proxy",
    "--retries", "--timeout", "--exists-action", "--global-option", "--config-settings",
    "-C", "--only-binary", "--no-binary", "--report", "--python", "-p", "--index-strategy",
    "--keyring-provider", "--extra", "--overrides", "--build-constraints",
}  # fmt: skip


def pip_install(command: Command) -> PipInstall | None:
    words = command.words
    start = None
    for index in range(1, len(words)):
        if words[index] == "install" and re.fullmatch(
            r"pip(\d+(\.\d+)*)?", PurePosixPath(words[index - 1]).name
        ):
            start = index + 1
            break
    if start is None:
        return None
    names: list[str] = []
    target = None
    upgrade = False
    rest = iter(words[start:])
    for word in rest:
        if word.startswith("-"):
            option, eq, value = word.partition("=")
            if option in ("-U", "--upgrade", "--force-reinstall"):
                upgrade = True
            if option in _PIP_VALUE_OPTIONS and not eq:
                value = next(rest, "")
            if option in ("-t", "--target"):
                target = value
            continue
        if "/" in word or word.endswith(".whl"):
            continue  # a path or URL, not a name we can compare
        try:
            names.append(canonicalize_name(Requirement(word).name))
        except InvalidRequirement:
            continue
    return PipInstall(tuple(names), target, upgrade, command.where)


def pip_installs(container: Container) -> list[PipInstall]:
    """The `pip install` commands among a container's command and args."""
    found = (pip_install(c) for c in container.commands)
    return [p for p in found if p is not None]


def unquoted_comparisons(text: str) -> list[str]:
    """Words like `numpy>=1.24.0` outside quotes, which sh splits into `numpy` and a redirection."""
    found = []
    quote = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                index += 1
        elif char in "'\"":
            quote = char
        elif char == "\\":
            index += 1
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            break
        elif char in "<>" and index > 0:
            before = re.search(r"[A-Za-z0-9_.\-\[\],]+$", text[:index])
            after = re.match(r"[<>=!~]*[^\s;&|'\"]*", text[index:])
            if before and not before.group(0).isdigit() and after:
                found.append(before.group(0) + after.group(0))
        index += 1
    return found
