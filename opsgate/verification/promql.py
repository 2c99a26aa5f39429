"""Render PromQL templates with proposal data, without letting the data change the query.

Catalog queries carry `{target}`, `{environment}` and `{param}` placeholders. A value
is only ever substituted as the *content of a double-quoted label-matcher value*, e.g.
`http_requests_total{service="{target}"}`, and it is escaped so that it stays exactly
one string literal whatever it contains:

- PromQL string escaping: backslash, double quote, newline, carriage return and tab
  become `\\\\`, `\\"`, `\\n`, `\\r`, `\\t`; every other control character becomes
  `\\xHH` (or `\\u00HH` for C1 controls) and U+FFFD becomes `\\ufffd` (the PromQL lexer
  refuses it raw).
- In a regex matcher (`=~`, `!~`) the value is first RE2-quoted (like Go's
  `regexp.QuoteMeta`), so `a.b` matches the label value `a.b` only and `.*` matches
  the label value `.*` only. Proposal data is data, never a pattern.

A placeholder anywhere else (a range `[{window}]`, a number, a single-quoted or
backtick string, a label name, a comment, a non-matcher string argument) is refused
with a ValueError naming it, as is a placeholder with no value. The template is never
passed to `str.format`: braces are PromQL syntax (`{service="{target}"}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # attributes only: this module stays free of the models at run time
    from opsgate.models import VerificationSpec

from opsgate.shared import PLACEHOLDER

__all__ = ["escape_string_content", "quote_meta", "render_query"]

PlaceholderValue = str | int | float | bool

_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")
_MATCHER_OPERATORS = ("=~", "!~", "!=", "=")


def quote_meta(value: str) -> str:
    """Escape every RE2 metacharacter, like Go's `regexp.QuoteMeta`."""
    return "".join("\\" + ch if ch in _RE2_SPECIAL else ch for ch in value)


def escape_string_content(value: str) -> str:
    """Escape `value` to be the content of a double-quoted PromQL string."""
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0x80 <= code <= 0x9F or code == 0xFFFD:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError("value is not valid Unicode (lone surrogate)")
        else:
            out.append(ch)
    return "".join(out)


def _stringify(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(f"placeholder {{{name}}}: unsupported value type {type(value).__name__}")


def _refuse_placeholders(segment: str, where: str) -> None:
    match = PLACEHOLDER.search(segment)
    if match:
        raise ValueError(
            f"placeholder {{{match.group(1)}}} is {where}; placeholders are only allowed "
            'inside a double-quoted label matcher value, e.g. {service="{target}"}'
        )


def _string_end(template: str, start: int) -> int:
    """Index just past the string literal opening at `start`."""
    quote = template[start]
    i = start + 1
    while i < len(template):
        ch = template[i]
        if quote != "`" and ch == "\\":
            i += 2
            continue
        if ch == quote:
            return i + 1
        if ch == "\n" and quote != "`":
            break
        i += 1
    raise ValueError(f"unterminated string starting at offset {start} in query template")


def _render_matcher_value(
    content: str, values: Mapping[str, PlaceholderValue], *, regex: bool
) -> str:
    out: list[str] = []
    i = 0
    while i < len(content):
        ch = content[i]
        if ch == "\\":
            out.append(content[i : i + 2])
            i += 2
            continue
        if ch == "{":
            match = PLACEHOLDER.match(content, i)
            if match:
                name = match.group(1)
                if name not in values:
                    raise ValueError(f"unknown placeholder {{{name}}}: no value for it")
                text = _stringify(name, values[name])
                if regex:
                    text = quote_meta(text)
                out.append(escape_string_content(text))
                i = match.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def render_query(template: str, values: Mapping[str, PlaceholderValue]) -> str:
    """Substitute `values` into the label-matcher strings of a PromQL `template`.

    Raises ValueError naming the placeholder when it has no value or sits anywhere but
    inside a double-quoted label matcher value; raises ValueError on an unterminated
    string. Text without placeholders is copied unchanged.
    """
    out: list[str] = []
    i = 0
    n = len(template)
    in_selector = False  # between the `{` and `}` of a vector selector
    pending_op: str | None = None  # matcher operator seen, its value not yet
    while i < n:
        ch = template[i]
        if ch == "#":  # a comment runs to the end of the line
            end = template.find("\n", i)
            end = n if end < 0 else end
            _refuse_placeholders(template[i:end], "inside a comment")
            out.append(template[i:end])
            i = end
            continue
        if ch in "\"'`":
            end = _string_end(template, i)
            content = template[i + 1 : end - 1]
            if ch == '"' and in_selector and pending_op is not None:
                rendered = _render_matcher_value(content, values, regex="~" in pending_op)
                out.append(f'"{rendered}"')
            else:
                kind = {"'": "single-quoted", "`": "backtick"}.get(ch, "double-quoted")
                where = (
                    f"inside a {kind} string"
                    if ch != '"'
                    else "inside a string that is not a label matcher value"
                )
                _refuse_placeholders(template[i:end], where)
                out.append(template[i:end])
            pending_op = None
            i = end
            continue
        if ch == "{":
            match = PLACEHOLDER.match(template, i)
            if match:
                _refuse_placeholders(match.group(0), "outside any string")
            in_selector = True
            pending_op = None
        elif ch == "}":
            in_selector = False
            pending_op = None
        elif in_selector and ch in "=!":
            op = next((o for o in _MATCHER_OPERATORS if template.startswith(o, i)), None)
            if op is not None:
                out.append(op)
                pending_op = op
                i += len(op)
                continue
            pending_op = None
        elif not ch.isspace():
            pending_op = None
        out.append(ch)
        i += 1
    return "".join(out)


def render_queries(spec: VerificationSpec, values: Mapping[str, Any]) -> dict[str, str]:
    """Each signal's and stop condition's PromQL with values as escaped label values;
    ValueError naming the query that cannot be rendered."""
    scalars = {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)}
    rendered: dict[str, str] = {}
    queries = [(s.name, s.query) for s in spec.signals]
    queries += [(c.name, c.query) for c in spec.stop_conditions]
    for name, query in queries:
        try:
            rendered[name] = render_query(query, scalars)
        except ValueError as exc:
            raise ValueError(f"verification query {name}: {exc}") from None
    return rendered
