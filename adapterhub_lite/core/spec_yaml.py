"""A task spec's YAML file, read strictly: PyYAML's safe loader, but a key given twice is refused.

PyYAML keeps the last of two equal keys without a word, so `lr: 2.0e-3` … `lr: 0.5` under `train:` trained at
0.5. Here a duplicate (at any depth) and a syntax error are each a SpecError naming the line(s) and the fix.
Kept apart from spec.py, which says what a spec holds; this module only says how its file is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adapterhub_lite.core.errors import SpecError


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, mapping: yaml.MappingNode, key: Any, first: yaml.Node, second: yaml.Node):
        super().__init__(f"duplicate key {key!r}")
        self.mapping, self.key, self.first, self.second = mapping, key, first, second


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key given twice in one mapping (at any depth) is refused: PyYAML keeps the
    last silently, so `lr: 2.0e-3` … `lr: 0.5` under `train:` trained at 0.5 without a word.
    A merge key (`<<: *base`) still lets the mapping's own keys replace the merged ones."""

    def get_single_node(self):
        self._root = super().get_single_node()
        return self._root

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


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`; a syntax error or a duplicate key is a SpecError naming the line(s) and the fix."""
    loader = _StrictLoader(path.read_text())
    try:
        return loader.get_single_data()
    except _DuplicateKey as dup:
        name = _key_path(getattr(loader, "_root", None), dup.mapping, dup.key)
        lines = f"lines {dup.first.start_mark.line + 1} and {dup.second.start_mark.line + 1}"
        raise SpecError([f"key {name!r} is given twice ({lines}; YAML would silently keep the last); keep one"],
                        f"task spec {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        near = f" near line {mark.line + 1}" if mark is not None else ""
        said = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
        raise SpecError([f"YAML does not parse: {said}; check the indentation and quoting{near} "
                         "(a value holding ': ', '#' or starting with '{', '[', '*', '&' or '%' needs quotes)"],
                        f"task spec {path}") from None
    finally:
        loader.dispose()
