"""A task spec's YAML file, read strictly: PyYAML's safe loader, but a key given twice is refused, and so is a
number YAML 1.1 reads as other than it looks.

PyYAML keeps the last of two equal keys without a word, so `lr: 2.0e-3` … `lr: 0.5` under `train:` trained at
0.5; and it reads `010` as the octal number 8 and `1:30` as the base-60 number 90, so `labels: {010: ten}`
keyed the column value '8'. Here a duplicate (at any depth), such a number and a syntax error are each a SpecError
naming the line(s) and the fix.
Kept apart from spec.py, which says what a spec holds; this module only says how its file is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.text import read_text


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, mapping: yaml.MappingNode, key: Any, first: yaml.Node, second: yaml.Node):
        super().__init__(f"duplicate key {key!r}")
        self.mapping, self.key, self.first, self.second = mapping, key, first, second


class _Surprising(yaml.YAMLError):
    def __init__(self, node: yaml.ScalarNode, value: Any, why: str):
        super().__init__(f"{node.value!r} {why}")
        self.node, self.value, self.why = node, value, why


# YAML 1.1's octal (a leading 0 then digits: 010 is 8, 007 is 7) and base-60 (1:30 is 90) forms: what they give
# is not what a reader of the file sees. Hex (0x1F) and 1_000 say what they are, so they stay.
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
_BASE60 = re.compile(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key given twice in one mapping (at any depth) is refused: PyYAML keeps the
    last silently, so `lr: 2.0e-3` … `lr: 0.5` under `train:` trained at 0.5 without a word.
    A merge key (`<<: *base`) still lets the mapping's own keys replace the merged ones."""

    def get_single_node(self):
        self._root = super().get_single_node()
        return self._root

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        if _OCTAL.fullmatch(node.value):
            raise _Surprising(node, value, f"is read by YAML 1.1 as the octal number {value}")
        if _BASE60.fullmatch(node.value):
            raise _Surprising(node, value, f"is read by YAML 1.1 as the base-60 number {value}")
        return value

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        if _BASE60.fullmatch(node.value):
            raise _Surprising(node, value, f"is read by YAML 1.1 as the base-60 number {value}")
        return value

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeConstructor refuses it itself
                    continue
                if first is not key_node:
                    raise _DuplicateKey(node, key, first, key_node)
        return super().construct_mapping(node, deep=deep)


# SafeLoader dispatches by tag through a table of its own functions, not by method name.
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def _key_path(root: yaml.Node | None, target: yaml.MappingNode, key: Any) -> str:
    """The dotted path of `key` in mapping `target` under `root` (`train.lr`; `[i]` for a list item)."""
    def walk(node, prefix):
        if node is target:
            return prefix
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [(v, f"{prefix}.{k.value}" if prefix else str(k.value)) for k, v in node.value]
        elif isinstance(node, yaml.SequenceNode):
            children = [(v, f"{prefix}[{i}]") for i, v in enumerate(node.value)]
        for child, name in children:
            found = walk(child, name)
            if found is not None:
                return found
        return None

    prefix = walk(root, "") if root is not None else None
    return f"{prefix}.{key}" if prefix else str(key)


def _surprise(odd: _Surprising, where: str) -> str:
    return (f"{odd.node.value}{where} {odd.why}; quote it ('{odd.node.value}') to keep the text, "
            "or write the number without leading zeros or colons")


def check_numbers(text: str, override: str) -> None:
    """Refuse a command-line override's value holding a number YAML 1.1 reads as other than it looks (`010`: 8),
    as the file's reading does; other YAML errors are the caller's (it takes such a value as written)."""
    try:
        yaml.load(text, Loader=_StrictLoader)
    except _Surprising as odd:
        raise SpecError([_surprise(odd, f" in {override!r}")], "overrides") from None
    except yaml.YAMLError:
        pass


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a syntax error or a duplicate key is a SpecError naming the line(s) and the fix."""
    loader = _StrictLoader(read_text(path))  # not UTF-8: one line naming the line (read_text() raised a traceback), a BOM dropped
    try:
        return loader.get_single_data()
    except _DuplicateKey as dup:
        name = _key_path(getattr(loader, "_root", None), dup.mapping, dup.key)
        lines = f"lines {dup.first.start_mark.line + 1} and {dup.second.start_mark.line + 1}"
        raise SpecError([f"key {name!r} is given twice ({lines}; YAML would silently keep the last); keep one"],
                        f"task spec {path}") from None
    except _Surprising as odd:
        raise SpecError([_surprise(odd, f" (line {odd.node.start_mark.line + 1})")], f"task spec {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        near = f" near line {mark.line + 1}" if mark is not None else ""
        said = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
        raise SpecError([f"YAML does not parse: {said}; check the indentation and quoting{near} "
                         "(a value holding ': ', '#' or starting with '{', '[', '*', '&' or '%' needs quotes)"],
                        f"task spec {path}") from None
    finally:
        loader.dispose()
