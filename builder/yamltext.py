"""Editing YAML text in place: only the lines that must change, in the file's own style.

ruamel.yaml's round trip finds nodes and their lines; the edits are made to the text. A dump of
the whole document would re-flow flow mappings (`{ cpu: "2" }` -> `{cpu: "2"}`), re-indent
sequences written in another style than the first one found, and move comments: in a GitOps
repository every such line is noise in review, and Flux `# {"$imagepolicy": ...}` markers must
stay byte for byte. Callers parse the result again and compare it with what they meant.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString

from builder.errors import BadInputError
from builder.yamlload import load_yaml

QUOTED = (DoubleQuotedScalarString, SingleQuotedScalarString)


# --- a small block-style YAML writer, in the file's own style --------------------------------


@dataclass(frozen=True)
class Style:
    indent: int = 2  # a mapping's children, relative to its key
    seq_offset: int = 0  # a sequence's dashes, relative to its parent key (0 or 2, usually)
    quote: str = '"'  # for strings that must be quoted
    always_quote: frozenset[str] = frozenset()  # keys whose string values are always quoted


_PLAIN = re.compile(r"^[A-Za-z0-9_/.][A-Za-z0-9_./:@+=-]*$")
_LOOKS_TYPED = re.compile(
    r"^(?:y|n|yes|no|on|off|true|false|null|~|[-+]?\.?\d[\d._:eE+-]*|\.inf|\.nan|0x.*|0o.*)$",
    re.IGNORECASE,
)


def scalar(value: object, style: Style, *, force_quote: bool = False) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if (
        not force_quote
        and _PLAIN.match(text)
        and not _LOOKS_TYPED.match(text)
        and not text.endswith(":")
    ):
        return text
    if style.quote == "'" and "\n" not in text:
        return "'" + text.replace("'", "''") + "'"
    return json.dumps(text, ensure_ascii=False)


def emit_mapping(mapping: Mapping[str, Any], col: int, style: Style) -> list[str]:
    lines = []
    pad = " " * col
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            if value:
                lines.append(f"{pad}{key}:")
                lines.extend(emit_mapping(value, col + style.indent, style))
            else:
                lines.append(f"{pad}{key}: {{}}")
        elif isinstance(value, list):
            if value:
                lines.append(f"{pad}{key}:")
                lines.extend(emit_sequence(value, col + style.seq_offset, style))
            else:
                lines.append(f"{pad}{key}: []")
        else:
            quote = key in style.always_quote
            lines.append(f"{pad}{key}: {scalar(value, style, force_quote=quote)}")
    return lines


def emit_sequence(items: list[Any], dash_col: int, style: Style) -> list[str]:
    lines = []
    pad = " " * dash_col
    for item in items:
        if isinstance(item, Mapping) and item:
            inner = emit_mapping(item, dash_col + 2, style)
            inner[0] = f"{pad}- {inner[0][dash_col + 2 :]}"
            lines.extend(inner)
        elif isinstance(item, (Mapping, list)):
            lines.append(f"{pad}- {'{}' if isinstance(item, Mapping) else '[]'}")
        else:
            lines.append(f"{pad}- {scalar(item, style)}")
    return lines


# --- locating nodes in the text ---------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_filler(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _is_dash(line: str, col: int) -> bool:
    rest = line[col:]
    return _indent(line) == col and (rest.startswith("- ") or rest.rstrip() == "-")


def _trim(lines: list[str], start: int, end: int, col: int) -> int:
    """Give back trailing blank lines and comments at or left of `col` (they lead what follows)."""
    while end - 1 > start:
        line = lines[end - 1]
        if not line.strip() or (line.strip().startswith("#") and _indent(line) <= col):
            end -= 1
            continue
        break
    return end


def _scan_end(lines: list[str], start: int, col: int, dashes_belong: bool) -> int:
    """The line after a node that starts at `start`, whose content is indented past `col`."""
    end = start + 1
    i = start + 1
    while i < len(lines):
        line = lines[i]
        if _is_filler(line):
            i += 1
            continue
        if _indent(line) > col or (dashes_belong and _is_dash(line, col)):
            end = i + 1
            i += 1
            continue
        break
    return end


def _first_line(node: Any, fallback: tuple[int, int]) -> tuple[int, int]:
    """Line and column where a node's content starts (ruamel's own mark for a block mapping in
    a sequence can point at a comment above it)."""
    marks: Any = getattr(node, "lc", None)  # ruamel's line/column marks
    if marks is not None and isinstance(node, Mapping) and node:
        line, column = marks.key(next(iter(node)))
        return int(line), int(column)
    return fallback


def _item_dash(lines: list[str], seq: Any, index: int) -> tuple[int, int]:
    """(line, column) of the dash that starts item `index` of a block sequence."""
    line, col = _first_line(seq[index], tuple(seq.lc.item(index)))
    text = lines[line]
    dash = text.rfind("-", 0, col)
    if dash >= 0 and not text[:dash].strip():
        return line, dash
    for earlier in range(line - 1, -1, -1):  # `-` alone on a line, the item below it
        text = lines[earlier]
        if _is_filler(text):
            continue
        if text.strip() == "-":
            return earlier, _indent(text)
        break
    raise BadInputError(f"line {line + 1}: cannot find the `-` of this list item")


def _item_span(lines: list[str], seq: Any, index: int) -> tuple[int, int, int]:
    start, dash = _item_dash(lines, seq, index)
    if index + 1 < len(seq):
        end, _ = _item_dash(lines, seq, index + 1)
    else:
        end = _scan_end(lines, start, dash, dashes_belong=False)
    return start, _trim(lines, start, end, dash), dash


def _key_span(lines: list[str], mapping: Any, key: str) -> tuple[int, int, int]:
    start, col = mapping.lc.key(key)
    keys = list(mapping)
    position = keys.index(key)
    if position + 1 < len(keys):
        end = mapping.lc.key(keys[position + 1])[0]
    else:
        end = _scan_end(lines, start, col, dashes_belong=True)
    return start, _trim(lines, start, end, col), col


def _mapping_end(lines: list[str], mapping: Any) -> tuple[int, int]:
    """(line after the mapping's last key's value, column of its keys)."""
    last = list(mapping)[-1]
    _, end, col = _key_span(lines, mapping, last)
    return end, col


def _seq_offset(lines: list[str], mapping: Any, key: str) -> int | None:
    value = mapping.get(key)
    if not isinstance(value, list) or not value or not hasattr(value, "lc"):
        return None
    if mapping.lc.value(key)[0] == mapping.lc.key(key)[0]:
        return None  # a flow sequence on the key's line
    _, dash = _item_dash(lines, value, 0)
    return int(dash - mapping.lc.key(key)[1])


def _detect_seq_offset(lines: list[str], mappings: list[Any]) -> int:
    for mapping in mappings:
        for key in mapping:
            offset = _seq_offset(lines, mapping, key)
            if offset is not None and offset >= 0:
                return offset
    return 0


def _detect_indent(mappings: list[Any]) -> int:
    for mapping in mappings:
        for key, value in mapping.items():
            if isinstance(value, Mapping) and value and hasattr(value, "lc"):
                child_line, child_col = value.lc.key(next(iter(value)))
                if child_line != mapping.lc.key(key)[0]:
                    return max(1, int(child_col - mapping.lc.key(key)[1]))
    return 2


def _quote_style(text: str) -> str:
    """The quote most of the file's quoted scalars use."""
    double = len(re.findall(r':\s+"', text)) + len(re.findall(r'-\s+"', text))
    single = len(re.findall(r":\s+'", text)) + len(re.findall(r"-\s+'", text))
    return "'" if single > double else '"'


@dataclass(frozen=True)
class Edit:
    start: int  # first line replaced
    end: int  # line after the last one replaced (== start: an insertion)
    lines: tuple[str, ...]
    order: int = 0  # insertions at one line keep the order they were made in

    @property
    def position(self) -> tuple[int, int, int, int]:
        """Where the edit's lines go relative to others: at one line, deeper text goes first
        (an item appended to the last list of a mapping precedes a key added to a parent)."""
        column = _indent(self.lines[0]) if self.lines else 0
        return (self.start, self.end, -column, self.order)


def plain(node: Any) -> Any:
    """A ruamel round-trip node as plain dicts, lists and scalars (comments and styles dropped)."""
    if isinstance(node, Mapping):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, TaggedScalar):  # `!!str x`, `!custom x`: ruamel keeps the tag, and
        return plain(node.value)  # compares by identity; the value is what Kubernetes reads
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    return node


def load_documents(text: str, where: str) -> list[Any]:
    """Every document in `text`, through the one bounded loader (builder.yamlload says why)."""
    return load_yaml(text, where).documents


class TextEditor:
    """Collects line edits to a YAML text; `apply` makes them. The style (indentation, dash
    offset, quotes) is read from `near`, the mappings around the places being edited."""

    def __init__(self, text: str, near: list[Any]) -> None:
        self.newline = "\r\n" if "\r\n" in text else "\n"
        self.lines = text.split(self.newline)
        self.edits: list[Edit] = []
        mappings = [m for m in near if isinstance(m, Mapping) and hasattr(m, "lc")]
        self.style = Style(
            indent=_detect_indent(mappings),
            seq_offset=_detect_seq_offset(self.lines, mappings),
            quote=_quote_style(text),
        )

    def _add(self, start: int, end: int, lines: list[str]) -> None:
        self.edits.append(Edit(start, end, tuple(lines), order=len(self.edits)))

    def upsert_items(
        self,
        mapping: Any,
        key: str,
        wanted: list[tuple[dict[str, Any], Any]],
        *,
        before_key: str | None = None,
        front: bool = False,
        always_quote: frozenset[str] = frozenset(),
    ) -> None:
        """Make the list `mapping[key]` hold each wanted item: one that its matcher accepts is
        replaced (when it differs), the others are added (at the front or the end); the key is
        created when missing."""
        style = Style(self.style.indent, self.style.seq_offset, self.style.quote, always_quote)
        seq = mapping.get(key)
        if key not in mapping:
            end, col = self._insertion_point(mapping, before_key)
            self._add(end, end, emit_mapping({key: [item for item, _ in wanted]}, col, style))
            return
        if seq is None or not len(seq) or mapping.lc.value(key)[0] == mapping.lc.key(key)[0]:
            # `key:`, `key: []` or a flow list: written again as a block list.
            items = upsert_plain(plain(seq) or [], wanted, front=front)
            start, end, col = _key_span(self.lines, mapping, key)
            self._add(start, end, emit_mapping({key: items}, col, style))
            return
        added = []
        for item, matches in wanted:
            for index, existing in enumerate(seq):
                # Matchers see plain data, as in upsert_plain (a tagged `!!str` name matches).
                if isinstance(existing, Mapping) and matches(plain(existing)):
                    if plain(existing) != item:
                        start, end, dash = _item_span(self.lines, seq, index)
                        self._add(start, end, emit_sequence([item], dash, style))
                    break
            else:
                added.append(item)
        if not added:
            return
        if front:
            line, dash = _item_dash(self.lines, seq, 0)
            line = self._above_comments(line, dash)
        else:
            _, line, dash = _item_span(self.lines, seq, len(seq) - 1)
        self._add(line, line, emit_sequence(added, dash, style))

    def remove_items(self, mapping: Any, key: str, matches: Any) -> None:
        """Remove the items of the list `mapping[key]` that `matches` accepts (the key itself
        when none is left)."""
        seq = mapping.get(key)
        if key not in mapping or not seq:
            return
        doomed = [
            index
            for index, existing in enumerate(seq)
            if isinstance(existing, Mapping) and matches(plain(existing))
        ]
        if not doomed:
            return
        flow = mapping.lc.value(key)[0] == mapping.lc.key(key)[0]
        if len(doomed) == len(seq) or flow:
            start, end, col = _key_span(self.lines, mapping, key)
            kept = [item for index, item in enumerate(plain(seq)) if index not in doomed]
            self._add(start, end, emit_mapping({key: kept}, col, self.style) if kept else [])
            return
        for index in doomed:
            start, end, _ = _item_span(self.lines, seq, index)
            self._add(start, end, [])

    def apply(self) -> str:
        """The text with every collected edit made."""
        return self.newline.join(apply_edits(self.lines, self.edits))

    def _above_comments(self, line: int, col: int) -> int:
        """Move up past the comment lines at `col` that introduce the node at `line`."""
        while (
            line > 0
            and self.lines[line - 1].strip().startswith("#")
            and _indent(self.lines[line - 1]) == col
        ):
            line -= 1
        return line

    def _insertion_point(self, mapping: Any, before_key: str | None) -> tuple[int, int]:
        if before_key and before_key in mapping:
            line, col = mapping.lc.key(before_key)
            return self._above_comments(line, col), col
        return _mapping_end(self.lines, mapping)


def apply_edits(lines: list[str], edits: list[Edit]) -> list[str]:
    ordered = sorted(edits, key=lambda e: e.position)
    for first, second in itertools.pairwise(ordered):
        if second.start < first.end:
            raise AssertionError(f"overlapping edits at lines {first.start}-{second.end}")
    result = list(lines)
    for edit in reversed(ordered):
        result[edit.start : edit.end] = list(edit.lines)
    return result


def upsert_plain(
    items: list[Any], wanted: list[tuple[dict[str, Any], Any]], *, front: bool = False
) -> list[Any]:
    """The plain-data twin of `TextEditor.upsert_items`."""
    items = list(items)
    added = []
    for item, matches in wanted:
        for index, existing in enumerate(items):
            if isinstance(existing, dict) and matches(existing):
                items[index] = item
                break
        else:
            added.append(item)
    return [*added, *items] if front else [*items, *added]


def remove_plain(items: list[Any], matches: Any) -> list[Any]:
    """The plain-data twin of `TextEditor.remove_items`."""
    return [item for item in items if not (isinstance(item, dict) and matches(item))]


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )
