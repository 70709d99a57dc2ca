"""Values from outside, parsed and quoted within bounds: the one YAML loader of the project (config
files, command-line overrides, a run's ``config.yaml``, task YAMLs), the one bounded read of a file
named on a command line, and :func:`short`, how any value is quoted in a one-line error.

    data = load_yaml(text)                  # no duplicate keys, <= MAX_YAML_NODES values after aliases
    text = read_bounded(path, MAX_YAML_BYTES, "--config")   # a regular file, pipe or /dev/zero alike
    f"got {short(value)}"                  # never renders more than ~limit characters of value

A few hundred bytes of nested YAML aliases (a "billion laughs") expand to gigabytes; the bound is
checked on the composed document, before any value is built. Standard library and PyYAML only.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

MAX_YAML_BYTES = 1 << 20  # a config file is a few kB; more is a mistake (or an attack)
MAX_YAML_NODES = 10_000  # values after YAML aliases are expanded (a "billion laughs" document is tiny)


class BoundError(ValueError):
    """A value or file over its bound, or YAML that cannot be read: one line (the caller prefixes
    where it came from)."""


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters. Rendered within bounds (``reprlib``: a few
    items of each container, a few levels deep, long strings cut), so a value of any size costs
    nothing to quote."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = max(limit, 12)
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = r.maxdeque = r.maxarray = 6
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit + 20 else text[:limit] + "..."


def read_bounded(path: str | Path, limit: int, what: str) -> str:
    """The UTF-8 text of ``path``, read ``limit`` + 1 bytes at most whatever it is (a regular
    file, a pipe, /dev/zero); BoundError past ``limit`` or when not text. OSError passes through."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BoundError(f"{path}: more than {limit:,} bytes is not a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BoundError(f"{path}: is not UTF-8 text (a {what} is)") from None


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice in one mapping (YAML's "last one
    wins" would drop a value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise BoundError(f"(line {key_node.start_mark.line + 1}): key {short(key)} is given twice; "
                                 "keep one (YAML would silently use the last)")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _TaskLoader(_Loader):
    """The same, reading an application tag (lm-eval's ``!function utils.process_docs``) as its text."""


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: f"!{suffix} {getattr(node, 'value', '')}")


def _expanded_size(node, memo: dict[int, int]) -> int:
    """Nodes of ``node`` with every alias expanded (shared subtrees counted each time they appear)."""
    if id(node) not in memo:
        memo[id(node)] = MAX_YAML_NODES + 1  # a cycle (a recursive alias) counts as too large
        if isinstance(node, yaml.SequenceNode):
            kids = node.value
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            kids = []
        total = 1
        for kid in kids:
            total += _expanded_size(kid, memo)
            if total > MAX_YAML_NODES:
                break
        memo[id(node)] = total
    return memo[id(node)]


def load_yaml(text: str, *, app_tags: bool = False) -> Any:
    """``yaml.safe_load(text)`` within bounds: at most ``MAX_YAML_BYTES`` characters, no duplicate
    keys, at most ``MAX_YAML_NODES`` values once aliases are expanded (checked on the composed
    document, before any value is built); ``app_tags``: an application tag (``!function x``) reads
    as its text instead of being refused. Every failure is a one-line BoundError."""
    if len(text) > MAX_YAML_BYTES:
        raise BoundError(f"{len(text):,} characters of YAML is more than the {MAX_YAML_BYTES:,} a config holds")
    loader = (_TaskLoader if app_tags else _Loader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise BoundError(f"the YAML expands to more than {MAX_YAML_NODES:,} values (anchors and aliases?); "
                             "write the values out")
        return loader.construct_document(node)
    except RecursionError:
        raise BoundError("the YAML nests too deeply; write plain values") from None
    except yaml.constructor.ConstructorError as e:
        tag = " ".join(str(getattr(e, "problem", "") or e).split())[:120]
        line = f"(line {e.problem_mark.line + 1}): " if getattr(e, "problem_mark", None) else ""
        raise BoundError(f"{line}YAML tags like !!python are not allowed ({tag}); write plain values") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        said = getattr(e, "problem", None) or str(e)
        raise BoundError(f"invalid YAML{where}: {' '.join(str(said).split())[:120]}") from None
    finally:
        loader.dispose()
