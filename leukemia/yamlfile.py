"""YAML read as data: every YAML file the project reads (experiment configs, search spaces, a
served model's ``MLmodel``) goes through ``loads``.

``yaml.safe_load`` builds no objects, but it still expands aliases (a "billion laughs" file of
a few hundred bytes grows until memory runs out) and lets a repeated key silently replace the
first. Neither has a use in a config, so both are refused, and the text itself is capped.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

MAX_BYTES = 1 << 20  # a config or a search space is a few kB


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` without aliases and with unique keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "aliases (*name) are not accepted; write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                continue  # unhashable: SafeLoader's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def loads(text: str, source: str):
    """The value of the YAML document ``text``; ``ValueError`` naming ``source`` and the line
    for malformed YAML, an alias, a repeated key or a text over ``MAX_BYTES``."""
    if len(text) > MAX_BYTES:
        raise ValueError(f"{source} is larger than {MAX_BYTES} bytes; expected a short YAML file")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise ValueError(f"{source} is not readable YAML{at}: {problem}") from None


def not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read as one, for an error line:
    ``base: /etc`` is a folder, not a file that "does not exist"."""
    if path.is_dir():
        return "is a folder"
    return "is not a regular file" if path.exists() else "does not exist"


def load(path: str | os.PathLike, source: str | None = None):
    """``loads`` of the file at ``path`` (UTF-8); a file larger than ``MAX_BYTES`` is refused
    without being read whole."""
    source = source or repr(str(path))
    with open(path, "rb") as handle:
        raw = handle.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ValueError(f"{source} is larger than {MAX_BYTES} bytes; expected a short YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not UTF-8 text; expected a YAML file") from None
    return loads(text, source)
