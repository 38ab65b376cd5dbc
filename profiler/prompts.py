"""Prompt files for offline profiling: one prompt per line, a JSON list, or JSON Lines.

The format follows the suffix, so a plain-text prompt that happens to start with `{` or `[` is still
read as text:
- `.json`: a list whose items are strings or objects with a "prompt" or "text" string.
- `.jsonl` / `.ndjson`: one such item (an object or a string) per non-blank line.
- anything else: every non-blank line is one prompt, taken as written (no stripping inside).
Every malformed input is a `ValueError` naming the file and the line (or the JSON list item).
"""

from __future__ import annotations

import json
from pathlib import Path

_JSON_SUFFIXES = (".json",)
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PROMPT_KEYS = ("prompt", "text")


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of `path`, in file order; `ValueError` for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: no prompts, the file is empty")
    suffix = path.suffix.lower()
    if suffix in _JSON_SUFFIXES:
        return _read_json_list(path, text)
    if suffix in _JSONL_SUFFIXES:
        return _read_json_lines(path, text)
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _read_json_list(path: Path, text: str) -> list[str]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got a JSON {type(items).__name__}")
    if not items:
        raise ValueError(f"{path}: no prompts, the JSON list is empty")
    return [_prompt_of(item, f"{path} item {i}") for i, item in enumerate(items)]


def _read_json_lines(path: Path, text: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        prompts.append(_prompt_of(item, f"{path} line {lineno}"))
    return prompts


def _prompt_of(item: object, where: str) -> str:
    """A JSON item's prompt: the string itself, or an object's "prompt" (else "text") string."""
    if isinstance(item, dict):
        key = next((k for k in _PROMPT_KEYS if k in item), None)
        if key is None:
            raise ValueError(f"{where}: object has no \"prompt\" or \"text\" field (keys {sorted(item)[:5]})")
        item = item[key]
    if not isinstance(item, str):
        raise ValueError(f"{where}: prompt must be a string, got {type(item).__name__}")
    if not item.strip():
        raise ValueError(f"{where}: prompt is empty")
    return item
