from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opsgate.verification.promql import escape_string_content, quote_meta, render_query

# --- a tiny PromQL tokenizer, independent of the renderer's scanner ------------------------

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
}
_HEX_LENGTH = {"x": 2, "u": 4, "U": 8}
_OPERATORS = ("=~", "!~", "!=", "==", "<=", ">=")
_WORD = re.compile(r"[A-Za-z0-9_:.]+")


def _read_string(q: str, i: int) -> tuple[str, int]:
    """Decode the quoted string at q[i], PromQL/Go rules; returns (content, next index)."""
    quote = q[i]
    i += 1
    if quote == "`":
        end = q.index("`", i)
        return q[i:end], end + 1
    out: list[str] = []
    while True:
        if i >= len(q) or q[i] == "\n":
            raise SyntaxError("unterminated quoted string")
        ch = q[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            esc = q[i + 1]
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
                i += 2
            elif esc in _HEX_LENGTH:
                digits = q[i + 2 : i + 2 + _HEX_LENGTH[esc]]
                assert re.fullmatch(r"[0-9a-fA-F]+", digits), digits
                out.append(chr(int(digits, 16)))
                i += 2 + len(digits)
            else:
                raise SyntaxError(f"unknown escape sequence \\{esc}")
            continue
        if ch == "\ufffd":
            raise SyntaxError("invalid UTF-8 rune")
        out.append(ch)
        i += 1


def tokenize(q: str) -> list[tuple[str, str]]:
    """(kind, text) tokens; string tokens carry their decoded content."""
    tokens: list[tuple[str, str]] = []
    i = 0
    while i < len(q):
        ch = q[i]
        if ch.isspace():
            i += 1
        elif ch == "#":
            end = q.find("\n", i)
            i = len(q) if end < 0 else end
        elif ch in "\"'`":
            content, i = _read_string(q, i)
            tokens.append((f"string{ch}", content))
        elif (m := _WORD.match(q, i)) is not None:
            tokens.append(("word", m.group(0)))
            i = m.end()
        else:
            op = next((o for o in _OPERATORS if q.startswith(o, i)), ch)
            tokens.append(("op", op))
            i += len(op)
    return tokens


def structure(q: str) -> list[tuple[str, str]]:
    """The token structure: kinds and non-string texts (string contents are data)."""
    return [(kind, "" if kind.startswith("string") else text) for kind, text in tokenize(q)]


DESIGN_QUERY = (
    'sum(rate(http_requests_total{service="{target}",code=~"5.."}[1m])) '
    '/ sum(rate(http_requests_total{service="{target}"}[1m]))'
)
TEMPLATES = [
    DESIGN_QUERY,
    'up{service=~"{target}", env!="{environment}"} == 1',
    'sum by (code) (x{a="pre-{target}-post", b!~"{param}|other"}) # a comment\n> 0',
    'label_replace(up{job = "{target}"}, "dst", "$1", "src", "(.*)") or on() vector(0)',
    "histogram_quantile(0.99, sum by (le) (rate(lat_bucket{svc=\"{target}\",x='y'}[5m])))",
]

benign = {"target": "checkout", "environment": "prod", "param": "p"}

dangerous = st.text(
    alphabet=st.sampled_from(list("\"\\'`{}()[]#\n\r\t=~!,|.*+?^$ ax\x00\x7f\x85\ufffd")),
    max_size=40,
)
values = st.one_of(st.text(max_size=60), dangerous)


def _escaped_strings(template: str, rendered: str) -> list[tuple[str, str]]:
    return list(
        zip(
            [t for k, t in tokenize(template) if k.startswith("string")],
            [t for k, t in tokenize(rendered) if k.startswith("string")],
            strict=True,
        )
    )


@pytest.mark.parametrize("template", TEMPLATES)
@given(target=values, environment=values, param=values)
def test_values_never_change_the_token_structure(
    template: str, target: str, environment: str, param: str
) -> None:
    expected = structure(render_query(template, benign))
    rendered = render_query(
        template, {"target": target, "environment": environment, "param": param}
    )
    assert structure(rendered) == expected


@given(target=values)
def test_equality_matcher_value_round_trips_literally(target: str) -> None:
    rendered = render_query('x{service="{target}"}', {"target": target})
    assert tokenize(rendered)[4] == ('string"', target)


@given(target=values)
def test_regex_matcher_value_matches_only_itself(target: str) -> None:
    rendered = render_query('x{service=~"{target}"}', {"target": target})
    kind, pattern = tokenize(rendered)[4]
    assert kind == 'string"'
    assert pattern == quote_meta(target)
    assert re.fullmatch(pattern, target, flags=re.DOTALL)
    assert not re.fullmatch(pattern, target + "x", flags=re.DOTALL)


@given(value=values)
def test_escape_string_content_decodes_back(value: str) -> None:
    assert tokenize(f'"{escape_string_content(value)}"') == [('string"', value)]


# --- examples ------------------------------------------------------------------------------


def test_design_query_renders() -> None:
    assert render_query(DESIGN_QUERY, {"target": "checkout"}) == (
        'sum(rate(http_requests_total{service="checkout",code=~"5.."}[1m])) '
        '/ sum(rate(http_requests_total{service="checkout"}[1m]))'
    )


def test_injection_attempt_stays_a_label_value() -> None:
    payload = 'checkout"} or vector(1) or {x="'
    rendered = render_query('sum(x{service="{target}"})', {"target": payload})
    assert rendered == 'sum(x{service="checkout\\"} or vector(1) or {x=\\""})'
    assert structure(rendered) == structure('sum(x{service="a"})')


def test_regex_matcher_values_are_quoted() -> None:
    rendered = render_query('x{service=~"{target}|{target}-canary"}', {"target": "a.b"})
    assert rendered == 'x{service=~"a\\\\.b|a\\\\.b-canary"}'
    assert render_query('x{s!~"{target}"}', {"target": ".*"}) == 'x{s!~"\\\\.\\\\*"}'


def test_non_string_values() -> None:
    template = 'x{a="{n}", b="{f}", c="{t}", d="{no}"}'
    assert render_query(template, {"n": 3, "f": 0.5, "t": True, "no": False}) == (
        'x{a="3", b="0.5", c="true", d="false"}'
    )


def test_values_are_not_expanded_twice() -> None:
    rendered = render_query(
        'x{a="{target}", b="{environment}"}', {"target": "{environment}", "environment": "prod"}
    )
    assert rendered == 'x{a="{environment}", b="prod"}'


def test_text_without_placeholders_is_unchanged() -> None:
    template = (
        'sum(rate(x{code=~"5[0-9]{2}", a=\'{2}\', b="\\\\"}[5m] offset 1m)) # {2}\n'
        "/ on() group_left `raw{}` != 0"
    )
    assert render_query(template, {}) == template


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ('rate(x{service="{target}"}[{window}])', "window"),
        ("x > {threshold}", "threshold"),
        ("x{a='{target}'}", "target"),
        ("x{a=`{target}`}", "target"),
        ('label_replace(up, "dst", "{target}", "src", "")', "target"),
        ('up{job="x"} # {target}', "target"),
        ('up{ {target}="x"}', "target"),
        ('up{"{target}"}', "target"),
        ('count_values("{target}", up)', "target"),
    ],
)
def test_misplaced_placeholder_is_refused(template: str, name: str) -> None:
    with pytest.raises(ValueError, match=rf"placeholder \{{{name}\}}"):
        render_query(template, {"target": "checkout", "window": "5m", "threshold": 1})


def test_unknown_placeholder_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown placeholder \{nope\}"):
        render_query('x{a="{target}", b="{nope}"}', {"target": "checkout"})


def test_unterminated_string_is_refused() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        render_query('x{a="{target}}', {"target": "checkout"})
    with pytest.raises(ValueError, match="unterminated"):
        render_query('x{a="\n"}', {})


def test_lone_surrogate_is_refused() -> None:
    with pytest.raises(ValueError, match="Unicode"):
        render_query('x{a="{target}"}', {"target": "\ud800"})


def test_control_characters_are_escaped() -> None:
    assert escape_string_content('a"b\\c\nd\re\tf\x00g\x7fh\x85i\ufffd') == (
        'a\\"b\\\\c\\nd\\re\\tf\\x00g\\x7fh\\u0085i\\ufffd'
    )
