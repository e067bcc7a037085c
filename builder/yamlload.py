"""Reading YAML that someone else wrote: the one loader `gpubuild check` and `k8s patch` use.

Both need ruamel.yaml's round trip (line numbers, comments). It follows the YAML spec to the
letter, which a hostile or broken file turns against us:

- nesting: its composer and constructor recurse once per level, so ~300 levels of `[[[...` or of
  indented keys raise RecursionError;
- aliases: an alias stands for a copy of what its anchor names, and anchors can name lists of
  aliases ("billion laughs": 9 levels of 9 aliases are a few lines of text and 9**9 strings).
  ruamel shares one object per anchor, but everything that walks the data (check's rules,
  `plain()`, a deep copy) walks every copy: minutes, or MemoryError;
- an alias inside the node it names: ruamel quietly reads None there.

The composer below measures each node as it is composed, before any constructor or caller
recurses into it, and stops at the first node past a bound, naming the line and the bound. The
walkers are then bounded as well: nesting by MAX_DEPTH, everything aliases stand for by
MAX_ALIAS_NODES (on top of the nodes actually written, which the text's length bounds).
RecursionError and MemoryError are still caught here, as a last line of defence.

It also records every anchor, alias and merge key (`Sharing`) and each collection's span in the
text, so that `k8s patch`, which edits the text in place, can refuse to edit through them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import YAMLError
from ruamel.yaml.events import AliasEvent, MappingStartEvent, SequenceStartEvent
from ruamel.yaml.nodes import CollectionNode, MappingNode, ScalarNode, SequenceNode

from builder.errors import BadInputError

# Kubernetes manifests nest ~15 levels deep; 100 leaves room and keeps every recursive walker
# (ruamel's constructor takes a few frames a level) far from Python's 1000-frame limit.
MAX_DEPTH = 100
# A file may use aliases (a shared list of tolerations, say); this many nodes behind them is
# far more than any deployment file needs, and little enough to walk many times.
MAX_ALIAS_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"

Position = tuple[int, int]  # (line, column), both 0-based: ruamel's marks


def _one_line(problem: str, limit: int = 300) -> str:
    """ruamel's problems quote values, which may span lines (a duplicated `key: |` block):
    a finding and an error message are one line, and short."""
    line = " ".join(problem.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class YamlError(BadInputError):
    """A YAML text that does not parse, or that goes past a bound; names the file and line."""

    def __init__(self, where: str, line: int, problem: str) -> None:
        problem = _one_line(problem)
        super().__init__(f"{where}:{line}: {problem}")
        self.where = where
        self.line = line  # 1-based
        self.problem = problem


class YamlLimitError(YamlError):
    """Valid YAML past one of the loader's bounds (nesting, alias expansion, a recursive
    alias): gpubuild refuses to expand it."""


@dataclass(frozen=True)
class Sharing:
    """An anchor, alias or merge key in the text: what `k8s patch` must not edit through."""

    line: int  # 0-based, like ruamel's marks
    column: int
    kind: str  # "anchor", "alias" or "merge key"
    text: str  # as written: "&name", "*name", "<<"
    key: str | None = None  # the mapping key it is the value of
    used: bool = True  # an anchor: whether an alias names it (an unused one shares nothing)

    @property
    def position(self) -> Position:
        return (self.line, self.column)

    def __str__(self) -> str:
        return (
            f"{self.kind} `{self.key}: {self.text}`" if self.key else f"{self.kind} `{self.text}`"
        )


@dataclass(frozen=True)
class LoadedYaml:
    documents: list[Any]
    sharing: tuple[Sharing, ...] = ()
    # id(collection) -> its (start, end) in the text; `objects` keeps those ids valid.
    spans: Mapping[int, tuple[Position, Position]] = field(default_factory=dict)
    objects: tuple[Any, ...] = ()

    def span(self, node: Any) -> tuple[Position, Position] | None:
        return self.spans.get(id(node))

    def sharing_within(self, node: Any) -> list[Sharing]:
        """The aliases, merge keys and used anchors written inside `node`'s text."""
        span = self.span(node)
        if span is None:
            return []
        start, end = span
        return [s for s in self.sharing if s.used and start <= s.position < end]


class _Refused(Exception):
    """The text at `mark` cannot be read; load_yaml turns it into a YamlError."""

    def __init__(self, mark: Any, problem: str) -> None:
        super().__init__(problem)
        self.line = mark.line + 1 if mark is not None else 1
        self.problem = problem


class _Bound(_Refused):
    """A bound was passed at `mark`; load_yaml turns it into a YamlLimitError."""


def _key_text(parent: Any, index: Any) -> str | None:
    if isinstance(parent, MappingNode) and isinstance(index, ScalarNode):
        return str(index.value)
    return None


class _BoundedComposer(Composer):
    """ruamel's composer, measuring each node as it is made: how deep it nests and how many
    nodes it stands for with its aliases expanded. The bounds are checked before the node's
    children are composed (depth) or before an alias is handed on (expansion)."""

    # (max depth, max alias nodes): ruamel makes its composer with `Composer(loader=...)`
    # only, so load_yaml passes its bounds in a subclass.
    limits: tuple[int, int] = (MAX_DEPTH, MAX_ALIAS_NODES)

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        # A reused anchor name is legal YAML (the later one wins): no warning on stderr.
        self.warn_double_anchors = False
        self.max_depth, self.max_alias_nodes = self.limits
        self.sharing: list[Sharing] = []
        self._anchor_record: dict[str, int] = {}  # anchor -> index of its Sharing record
        self._used: set[int] = set()
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, nesting)
        self._levels = 0  # collections open around the node being composed
        self._aliased = 0  # nodes that aliases stood for so far, in the whole stream

    def compose_document(self: Any) -> Any:
        # Nodes of the previous document may be gone and their ids reused; anchors are
        # per document too.
        self._measured = {}
        self._anchor_record = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        key = _key_text(parent, index)
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # else ruamel reports the undefined alias
                self._expand(event, target)
                record = self._anchor_record.get(event.anchor)
                if record is not None:
                    self._used.add(record)
            self._share(event.start_mark, "alias", f"*{event.anchor}", key)
            return super().compose_node(parent, index)
        if event.anchor is not None:
            self._anchor_record[event.anchor] = len(self.sharing)
            self._share(event.start_mark, "anchor", f"&{event.anchor}", key)
        collection = isinstance(event, (MappingStartEvent, SequenceStartEvent))
        if collection:
            if self._levels >= self.max_depth:
                raise _Bound(event.start_mark, self._too_deep())
            self._levels += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            if collection:
                self._levels -= 1
        self._measure(node)
        if index is None and isinstance(parent, MappingNode) and node.tag == _MERGE_TAG:
            self._share(event.start_mark, "merge key", str(node.value))
        return node

    def _too_deep(self) -> str:
        return (
            f"nested more than {self.max_depth} levels deep (lists and mappings inside each "
            f"other, aliases counted as copies); gpubuild reads at most {self.max_depth}"
        )

    def _expand(self, event: Any, target: Any) -> None:
        measured = self._measured.get(id(target))
        if measured is None:  # anchored, still being composed: the alias is inside it
            raise _Bound(
                event.start_mark,
                f"alias *{event.anchor} is inside the node it names, which therefore contains "
                "itself (a recursive structure): Kubernetes cannot use it",
            )
        nodes, nesting = measured
        if self._levels + nesting > self.max_depth:
            raise _Bound(event.start_mark, self._too_deep())
        self._aliased += nodes
        if self._aliased > self.max_alias_nodes:
            raise _Bound(
                event.start_mark,
                f"aliases stand for more than {self.max_alias_nodes} nodes (each alias counts "
                "as a copy of what it names; an alias bomb?); gpubuild expands at most "
                f"{self.max_alias_nodes}",
            )

    def _measure(self, node: Any) -> None:
        if isinstance(node, SequenceNode):
            children: Iterable[Any] = node.value
        elif isinstance(node, MappingNode):
            children = (part for pair in node.value for part in pair)
        else:
            self._measured[id(node)] = (1, 0)
            return
        sizes = [self._measured[id(child)] for child in children]
        nodes = 1 + sum(n for n, _ in sizes)
        self._measured[id(node)] = (nodes, 1 + max((d for _, d in sizes), default=0))

    def _share(self, mark: Any, kind: str, text: str, key: str | None = None) -> None:
        self.sharing.append(Sharing(mark.line, mark.column, kind, text, key))

    def records(self) -> tuple[Sharing, ...]:
        """Every anchor, alias and merge key, in the text's order; anchors know if used."""
        return tuple(
            replace(s, used=index in self._used) if s.kind == "anchor" else s
            for index, s in enumerate(self.sharing)
        )


# What ruamel's constructors raise, besides YAMLError, on values they cannot convert.
_CONVERSION_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)


class _SpanConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor, noting where each collection's text starts and ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spans: dict[int, tuple[Position, Position]] = {}
        self.objects: list[Any] = []

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            data = super().construct_object(node, deep=deep)
        except (YAMLError, _Refused):
            raise
        except _CONVERSION_ERRORS as exc:
            # ruamel converts an explicitly tagged scalar with int(), float(), a dict lookup:
            # `!!int abc` raises ValueError, `!!bool maybe` KeyError, `!!int 0x` IndexError.
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            what = repr(node.value) if isinstance(node, ScalarNode) else "this node"
            problem = f"not valid YAML: {what} is not a valid {tag} ({exc})"
            raise _Refused(node.start_mark, problem) from None
        if (
            isinstance(node, CollectionNode)
            and data is not None
            and node.end_mark is not None
            and id(data) not in self.spans
        ):
            start, end = node.start_mark, node.end_mark
            self.spans[id(data)] = ((start.line, start.column), (end.line, end.column))
            self.objects.append(data)
        return data


def _round_trip(max_depth: int, max_alias_nodes: int) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML(typ="rt", pure=True)
    yaml.preserve_quotes = True

    class Bounded(_BoundedComposer):
        limits = (max_depth, max_alias_nodes)

    yaml.Composer = Bounded
    yaml.Constructor = _SpanConstructor
    return yaml


def _syntax_error(exc: Exception, where: str) -> YamlError:
    from ruamel.yaml.error import MarkedYAMLError

    mark = getattr(exc, "problem_mark", None) if isinstance(exc, MarkedYAMLError) else None
    line = mark.line + 1 if mark is not None else 1
    text = str(exc).strip()
    problem = getattr(exc, "problem", None) or (text.splitlines()[0] if text else repr(exc))
    return YamlError(where, line, f"not valid YAML: {problem}")


def load_yaml(
    text: str,
    where: str,
    *,
    max_depth: int = MAX_DEPTH,
    max_alias_nodes: int = MAX_ALIAS_NODES,
) -> LoadedYaml:
    """Every document in `text` (ruamel round-trip data, with `.lc` line info), with its anchors,
    aliases and merge keys; a YamlError naming `where` and the line when it does not parse or
    passes a bound."""
    yaml = _round_trip(max_depth, max_alias_nodes)
    try:
        documents = list(yaml.load_all(text))
    except _Bound as exc:
        raise YamlLimitError(where, exc.line, exc.problem) from None
    except _Refused as exc:
        raise YamlError(where, exc.line, exc.problem) from None
    except YAMLError as exc:
        raise _syntax_error(exc, where) from None
    except _CONVERSION_ERRORS as exc:  # raised outside a node's construction: no line known
        raise YamlError(where, 1, f"not valid YAML: {exc!r}") from None
    except RecursionError:  # the bounds should make this impossible: a last line of defence
        raise YamlLimitError(where, 1, "nested too deeply for gpubuild to read") from None
    except MemoryError:
        raise YamlLimitError(where, 1, "too large for gpubuild to read into memory") from None
    constructor = yaml.constructor
    return LoadedYaml(
        documents,
        yaml.composer.records(),
        constructor.spans,
        tuple(constructor.objects),
    )
