"""YAML that someone else wrote, at its worst: builder.yamlload's bounds, and hypothesis feeding
mutated deployment files to the loader, to `gpubuild check` and to `k8s patch`.

Whatever the text, the answer is data, a GB001 finding or a BadInputError naming the file:
never another exception, never minutes of alias expansion, never a write to another file, and
no write at all when the patch refuses.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from builder import yamlload
from builder.check import check
from builder.errors import BadInputError
from builder.k8s import pod_snippet
from builder.k8s_patch import PatchResult, patch_ray_service
from builder.yamlload import (
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    YamlError,
    YamlLimitError,
    load_yaml,
)
from builder.yamltext import plain
from tests.test_k8s import IMAGE, manifest

TESTS = Path(__file__).parent
GUIDE = TESTS / "data" / "ray-service.yaml"
DEPLOY = TESTS / "fixtures" / "deploy-repo" / "draft-deployment" / "dev" / "ray-service.yaml"
REAL_FILES = [GUIDE, DEPLOY, *sorted((TESTS / "data" / "kuberay-samples").glob("*.yaml"))]
GROUP = "your-gpu-worker-group"  # in both GUIDE and DEPLOY


def alias_bomb(levels: int = 9, width: int = 9, indent: str = "") -> str:
    """A "billion laughs": width**levels strings when expanded, `levels` lines of text."""
    lines = [f"{indent}lol0: &lol0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        aliases = ", ".join([f"*lol{level - 1}"] * width)
        lines.append(f"{indent}lol{level}: &lol{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def flow(levels: int) -> str:
    return "[" * levels + "]" * levels


def block(levels: int) -> str:
    return "".join(f"{'  ' * level}k{level}:\n" for level in range(levels)) + "  " * levels + "v\n"


# --- the loader ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", REAL_FILES, ids=[p.name for p in REAL_FILES])
def test_real_files_load_as_ruamel_reads_them(path: Path) -> None:
    text = path.read_text()
    loaded = load_yaml(text, str(path))
    reference = list(YAML(typ="rt").load_all(text))
    assert [plain(d) for d in loaded.documents] == [plain(d) for d in reference]
    assert loaded.sharing == ()
    assert loaded.documents[0].lc.key("kind") == reference[0].lc.key("kind")


@pytest.mark.parametrize("nest", [flow, block], ids=["flow", "block"])
def test_nesting_up_to_the_bound_loads_and_past_it_is_refused(nest: object) -> None:
    deep = load_yaml(f"x: {nest(MAX_DEPTH - 1)}" if nest is flow else nest(MAX_DEPTH), "f.yaml")  # type: ignore[operator]
    plain(deep.documents[0])  # walkable: no RecursionError
    text = f"x: {nest(MAX_DEPTH)}" if nest is flow else nest(MAX_DEPTH + 1)  # type: ignore[operator]
    with pytest.raises(YamlLimitError) as caught:
        load_yaml(text, "f.yaml")
    expected_line = 1 if nest is flow else MAX_DEPTH + 1
    assert caught.value.line == expected_line
    assert str(caught.value).startswith(f"f.yaml:{expected_line}: nested more than {MAX_DEPTH}")


def test_nesting_counts_what_aliases_stand_for() -> None:
    anchored = f"a: &x {flow(60)}\n"
    load_yaml(anchored + f"b: {flow(39)[:39]}*x{flow(39)[39:]}\n", "f.yaml")
    with pytest.raises(YamlLimitError, match=r"^f\.yaml:2: nested more than"):
        load_yaml(anchored + f"b: {flow(40)[:40]}*x{flow(40)[40:]}\n", "f.yaml")


def test_alias_bomb_is_refused_at_the_alias_past_the_bound() -> None:
    with pytest.raises(YamlLimitError) as caught:
        load_yaml(alias_bomb(), "bomb.yaml")
    # lol0 is 10 nodes, lol1 91, ... lol5 597871: its aliases pass 100000.
    assert caught.value.line == 6
    assert f"more than {MAX_ALIAS_NODES} nodes" in str(caught.value)


def test_ordinary_aliases_load() -> None:
    text = (
        "gpu: &gpu\n  - {key: nvidia.com/gpu, operator: Exists}\n"
        "a: {tolerations: *gpu}\nb: {tolerations: *gpu}\n"
    )
    loaded = load_yaml(text, "f.yaml")
    assert plain(loaded.documents[0])["b"] == {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    }
    assert [(s.line, s.kind, str(s)) for s in loaded.sharing] == [
        (0, "anchor", "anchor `gpu: &gpu`"),
        (2, "alias", "alias `tolerations: *gpu`"),
        (3, "alias", "alias `tolerations: *gpu`"),
    ]


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(YamlLimitError, match=r"^f\.yaml:2: alias \*loop is inside"):
        load_yaml("a: 1\nloop: &loop {x: [*loop]}\n", "f.yaml")


def test_sharing_within_a_node_names_merge_keys_aliases_and_used_anchors() -> None:
    text = (
        "base: &base {cpu: 1}\n"
        "unused: &nobody {x: 1}\n"
        "group:\n"
        "  spec:\n"
        "    <<: *base\n"
        "    memory: 2\n"
        "other: {a: 1}\n"
    )
    loaded = load_yaml(text, "f.yaml")
    document = loaded.documents[0]
    assert [str(s) for s in loaded.sharing_within(document["group"])] == [
        "merge key `<<`",
        "alias `<<: *base`",
    ]
    assert loaded.sharing_within(document["other"]) == []
    assert loaded.sharing_within(document["unused"]) == []  # an anchor nobody uses
    assert [str(s) for s in loaded.sharing_within(document["base"])] == ["anchor `base: &base`"]


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(YamlError) as caught:
        load_yaml("a: 1\nb: [1, 2\n", "f.yaml")
    assert not isinstance(caught.value, YamlLimitError)
    assert isinstance(caught.value, BadInputError)
    assert str(caught.value).startswith("f.yaml:3: not valid YAML: ")


def test_a_problem_quoting_many_lines_is_one_line() -> None:
    with pytest.raises(YamlError) as caught:
        load_yaml("a: |\n  x\n  y\na: |\n  z\n", "f.yaml")
    assert str(caught.value) == (
        'f.yaml:4: not valid YAML: found duplicate key "a" with value "z " (original value: "x y ")'
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: 1\nb: !!int abc\n", "'abc' is not a valid !!int"),
        ("a: 1\nb: !!bool maybe\n", "'maybe' is not a valid !!bool"),
        ("a: 1\nb: !!float .5e\n", "'.5e' is not a valid !!float"),
        ("a: 1\nb: !!timestamp 2020-99-99\n", "is not a valid !!timestamp"),
    ],
)
def test_explicit_tags_that_do_not_convert_are_yaml_errors(text: str, problem: str) -> None:
    """ruamel converts `!!int abc` with int(): ValueError (KeyError, IndexError) unless caught."""
    with pytest.raises(YamlError) as caught:
        load_yaml(text, "f.yaml")
    assert str(caught.value).startswith("f.yaml:2: not valid YAML: ") and problem in str(
        caught.value
    )


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
def test_recursion_and_memory_errors_become_yaml_errors(
    monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    """The last line of defence, should a bound ever be missed."""

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(yamlload._SpanConstructor, "construct_object", fail)
    with pytest.raises(YamlLimitError, match=r"^f\.yaml:1: "):
        load_yaml("a: [1]\n", "f.yaml")


# --- hypothesis: mutated deployment files ---------------------------------------------------

_YAML_CHARS = "[]{}:,-&*!|>'\"#%@`?<\n\t abcx01."


MUTATIONS = (
    *("chars", "delete", "duplicate", "indent"),
    *("anchor", "alias", "merge", "share", "deep", "bomb", "tag"),
)
TAGS: tuple[str, ...] = ("!!int", "!!float", "!!bool", "!!str", "!!binary", "!!timestamp", "!!null")
TAGS += ("!!set", "!!omap", "!!seq", "!!map", "!custom", "!")


@st.composite
def hostile_yaml(draw: st.DrawFn) -> str:
    """A real deployment file, then a few mutations: bytes, lines, anchors and aliases, deep
    nesting, alias bombs."""
    text = draw(st.sampled_from([GUIDE, DEPLOY])).read_text()
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        where = draw(st.integers(0, len(lines) - 1))
        line = lines[where]
        indent = line[: len(line) - len(line.lstrip())]
        kind = draw(st.sampled_from(MUTATIONS))
        if kind == "chars":
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 3))
            text = text[:at] + draw(st.text(_YAML_CHARS, max_size=4)) + text[at + cut :]
            continue
        if kind == "delete":
            del lines[where]
        elif kind == "duplicate":
            lines.insert(where, line)
        elif kind == "indent":
            lines[where] = " " * draw(st.integers(0, 12)) + line.lstrip()
        elif kind == "anchor" and ":" in line:
            key, _, value = line.partition(":")
            lines[where] = f"{key}: &{draw(st.sampled_from('ab'))}{value}"
        elif kind == "share":  # an anchor, then an alias or a merge key of it further down
            keyed = [n for n, text in enumerate(lines) if ":" in text]
            first, second = sorted(draw(st.lists(st.sampled_from(keyed), min_size=2, max_size=2)))
            key, _, value = lines[first].partition(":")
            lines[first] = f"{key}: &s{value}"
            later = lines[second]
            if draw(st.booleans()):
                lines[second] = f"{later.partition(':')[0]}: *s"
            else:
                lines.insert(second + 1, f"{later[: len(later) - len(later.lstrip())]}<<: *s")
        elif kind == "tag" and ":" in line:
            key, _, value = line.partition(":")
            lines[where] = f"{key}: {draw(st.sampled_from(TAGS))}{value}"
        elif kind == "alias" and ":" in line:
            key = line.partition(":")[0]
            lines[where] = f"{key}: *{draw(st.sampled_from('ab'))}"
        elif kind == "merge":
            lines.insert(where, f"{indent}<<: *{draw(st.sampled_from('ab'))}")
        elif kind == "deep":
            levels = draw(st.integers(MAX_DEPTH - 5, 4 * MAX_DEPTH))
            nested = flow(levels) if draw(st.booleans()) else block(levels).replace("\n", " ")
            lines.insert(where, f"{indent}deep: {nested}")
        elif kind == "bomb":
            bomb = alias_bomb(draw(st.integers(2, 9)), draw(st.integers(2, 9)), indent)
            lines.insert(where, bomb.rstrip("\n"))
        text = "\n".join(lines)
    return text


HYPOTHESIS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@HYPOTHESIS
@given(hostile_yaml())
def test_loader_gives_data_or_a_yaml_error(text: str) -> None:
    try:
        loaded = load_yaml(text, "f.yaml")
    except YamlError as exc:
        assert str(exc).startswith(f"f.yaml:{exc.line}: ") and "\n" not in str(exc)
        return
    for document in loaded.documents:
        plain(document)  # bounded: walks every alias's copy without RecursionError


@HYPOTHESIS
@given(hostile_yaml(), st.sampled_from(["ray-service.yaml", "azure-pipelines.yaml"]))
def test_check_gives_findings_never_a_crash(text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text)
        result = check([path])
    for finding in result.findings:
        assert finding.path == str(path)
        assert "\n" not in finding.message


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@HYPOTHESIS
@given(hostile_yaml(), st.booleans())
def test_patch_writes_its_target_only_or_nothing(text: str, secret: bool) -> None:
    snippet = pod_snippet(manifest(), image=IMAGE, secret="gpubuild-sas" if secret else None)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ray-service.yaml"
        path.write_text(text)
        (Path(folder) / "other.yaml").write_text(text)
        before = _files(Path(folder))
        try:
            result = patch_ray_service(path, GROUP, snippet)
        except BadInputError as exc:
            assert str(exc).startswith(str(path))
            assert _files(Path(folder)) == before
            return
        after = _files(Path(folder))
    assert isinstance(result, PatchResult)
    assert after == {**before, "ray-service.yaml": result.text.encode()}
