"""How far back in time a PromQL query reads: the evidence floor after a change.

A measurement is evidence about a change only if every sample behind it was scraped
after the change. An instant query evaluated at `t` reads samples from
`t - lookback(query)` on: a range selector `m[5m]` reaches back 5 minutes, `offset 1m`
moves that another minute back, and a subquery `expr[10m:30s]` evaluates `expr` at
points up to 10 minutes back, each with its own windows. So for a query

    lookback = max over every selector of (its range + its offset
                                           + the range and offset of every subquery
                                           around it)

The tokenizer below skips string literals and comments (a label value may contain
`[5m]`), so only real range brackets count. A query pinned to an absolute time with
`@ <timestamp>` never reads post-change data at all: it is refused. Anything the
parser does not understand is refused too (ValueError): an unknown floor must not
become a floor of zero. A recording rule's own window is invisible from here; its
author covers it with `initial_delay`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["evidence_floor", "parse_promql_duration", "query_lookback"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|y|w|d|h|m|s)")
_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:\.\d+)?(?:ms|y|w|d|h|m|s))+(?![A-Za-z0-9_]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<punct>[()\[\]{},:@]|[-+*/%^]|==|!=|>=|<=|=~|!~|[=<>])
    """,
    re.VERBOSE,
)
_OPEN = {")": "(", "]": "[", "}": "{"}
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str


def parse_promql_duration(text: str) -> float:
    """Seconds from a PromQL duration (`5m`, `1h30m`, `250ms`) or a plain number."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a PromQL duration: {text!r}")
    return total


def _tokens(query: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if match is None:
            raise ValueError(f"cannot read the query at {query[pos : pos + 20]!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            out.append(_Token(kind, match.group()))
        pos = match.end()
    return out


def _matching_open(tokens: list[_Token], close: int) -> int:
    """The index of the bracket that `tokens[close]` closes."""
    want, mine, depth = _OPEN[tokens[close].text], tokens[close].text, 0
    for index in range(close, -1, -1):
        text = tokens[index].text
        if tokens[index].kind != "punct":
            continue
        if text == mine:
            depth += 1
        elif text == want:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError("unbalanced brackets in the query")


def _primary_start(tokens: list[_Token], last: int) -> int:
    """The first token of the expression that ends at `tokens[last]` and that a
    following `[...]`, `offset` or `@` modifies (a selector, a call, a group)."""
    if last < 0:
        raise ValueError("a range, offset or @ modifier with nothing before it")
    token = tokens[last]
    if token.kind == "punct" and token.text in _OPEN:
        start = _matching_open(tokens, last)
        if token.text == "]":  # x[5m:1m][10m:1m], x[5m] offset 1m: the same primary
            return _primary_start(tokens, start - 1)
        if start > 0 and tokens[start - 1].kind == "ident":
            if tokens[start - 1].text in _GROUPING:  # sum(x) by (job): the sum is the primary
                return _primary_start(tokens, start - 2)
            return start - 1  # a call or a metric name
        return start
    if token.kind == "ident":
        return last
    if token.kind in ("duration", "number") and last >= 1:
        before = tokens[last - 1]
        if before.kind == "ident" and before.text == "offset":
            return _primary_start(tokens, last - 2)
        if before.text in ("-", "+") and last >= 2 and tokens[last - 2].text == "offset":
            return _primary_start(tokens, last - 3)
        if before.text == "@":
            return _primary_start(tokens, last - 2)
    raise ValueError(f"cannot tell what {token.text!r} modifies")


def query_lookback(query: str) -> float:
    """Seconds before the evaluation time that `query`'s data can come from (0 for a
    query of instant selectors only). Raises ValueError for what it cannot bound."""
    tokens = _tokens(query)
    reach = [0.0] * len(tokens)

    def extend(start: int, end: int, seconds: float) -> None:
        for index in range(start, end):
            reach[index] += seconds

    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token.kind == "punct" and token.text == "[":
            close = index + 1
            while close < len(tokens) and tokens[close].text != "]":
                close += 1
            if close == len(tokens):
                raise ValueError("unclosed range bracket in the query")
            inner = tokens[index + 1 : close]
            if not inner or inner[0].kind not in ("duration", "number"):
                raise ValueError("a range must be a literal duration such as [5m]")
            if len(inner) > 1 and inner[1].text != ":":
                raise ValueError(f"unsupported range expression {''.join(t.text for t in inner)!r}")
            extend(_primary_start(tokens, index - 1), index, parse_promql_duration(inner[0].text))
            index = close + 1
            continue
        if token.kind == "ident" and token.text == "offset":
            nxt = index + 1
            sign = 1.0
            if nxt < len(tokens) and tokens[nxt].text in ("-", "+"):
                sign = -1.0 if tokens[nxt].text == "-" else 1.0
                nxt += 1
            if nxt >= len(tokens) or tokens[nxt].kind not in ("duration", "number"):
                raise ValueError("offset needs a literal duration")
            seconds = sign * parse_promql_duration(tokens[nxt].text)
            # A negative offset reads later samples, never earlier ones: no extra reach.
            extend(_primary_start(tokens, index - 1), index, max(0.0, seconds))
            index = nxt + 1
            continue
        if token.kind == "punct" and token.text == "@":
            pinned = tokens[index + 1] if index + 1 < len(tokens) else None
            if pinned is not None and pinned.kind == "ident" and pinned.text in ("start", "end"):
                index += 2  # an instant query's start() and end() are its own time
                continue
            raise ValueError("a query pinned to a fixed time with @ never reads post-change data")
        index += 1
    return max(reach, default=0.0)


def evidence_floor(queries: Iterable[str], scrape_interval: float) -> float:
    """Seconds after a change before every query reads post-change samples only:
    the longest look-back among `queries` plus one scrape interval (the first scrape
    after the change, which an instant selector needs too)."""
    longest = max((query_lookback(q) for q in queries), default=0.0)
    return longest + max(0.0, scrape_interval)
