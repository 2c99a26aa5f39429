"""What the embedded engine (regopy) refuses to evaluate, because it answers unlike OPA.

Every entry was found by running the same call through regopy and OPA's Go evaluator
(tests/unit/test_policy_fidelity.py has one test per entry, showing both answers). A
built-in is listed when regopy returns a *different value* (or a value where OPA
errors): under strict built-in errors an error denies, but a wrong value can allow.
Built-ins regopy merely lacks or rejects (net.cidr_*, strings.render_template,
time.parse_rfc3339_ns with a `Z`) error at evaluation and so deny; they are not listed.
Nor is `replace`: with an empty pattern regopy never returns, but that is a hang, which
the evaluation deadline turns into a deny (opsgate.policies.sandbox); with any other
pattern it agrees with OPA.

A bundle calling a refused built-in does not load in the embedded engine: every
decision denies with policy_engine_unavailable, naming file:line:col and the built-in.
The same bundle served by OPA (OPSGATE_POLICY_ENGINE=opa-embedded or opa) is fine.

Known divergences that are NOT refused, because the shipped policy needs the built-in
for its messages: `sprintf` formats some floats differently (`%v` of 1e20 or
123456789.123) and `%s` of a non-string. `sprintf` is refused unless its format is a
string literal using only the verbs %v, %s and %d without flags or width.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# name -> why (what regopy answers differently). Keep in step with the tests.
REFUSED_BUILTINS: dict[str, str] = {
    "semver.compare": 'compares versions as text: semver.compare("1.10.0", "1.9.0") is -1',
    "regex.match": r"is not RE2: `\A`, `\z`, `\pL` and (?i) do not work as in OPA",
    "regex.is_valid": "is not RE2: rejects (?P<name>...) groups OPA accepts",
    "regex.find_n": r"is not RE2: `\A` does not match",
    "regex.replace": r"is not RE2: `\A` does not match",
    "regex.find_all_string_submatch_n": r"is not RE2: `\pL` does not match",
    "strings.replace_n": "re-scans its own output (a->b, b->c turns ab into cc, not bc)",
    "lower": "leaves non-ASCII letters such as Σ and İ unchanged",
    "upper": "leaves some non-ASCII letters unchanged",
    "format_int": "rounds instead of truncating (format_int(-3.7, 10) is -4)",
    "to_number": 'accepts "0x10", " 1", "+1", ".5" and "1_000" (as 1) where OPA errors',
    "ceil": "answers differently for negative fractions",
    "floor": "answers differently for negative fractions",
    "indexof": "answers 0 for an empty needle where OPA errors",
    "time.format": "prints nine fraction digits where OPA prints none",
    "time.diff": "counts a month too many across a year boundary",
    "time.parse_ns": "accepts values that do not match the layout",
    "base64.decode": "accepts unpadded input OPA rejects",
    "urlquery.encode": "encodes a space as %20, OPA as +",
    "urlquery.encode_object": "encodes a space as %20, OPA as +",
    "urlquery.decode": "leaves + as +, OPA decodes it as a space",
    "object.union": "does not merge nested objects",
    "object.union_n": "does not merge nested objects",
    "trim_space": "does not trim Unicode spaces such as U+00A0",
    "uuid.parse": "names variants differently",
    "max": "orders numbers of different lengths as text: max([2, 10]) is 2",
    "min": "orders numbers of different lengths as text: min([2, 10]) is 10",
    "sort": "orders numbers of different lengths as text: sort([10, 2]) is [10, 2]",
}

SPRINTF_WHY = (
    "needs a string literal format with only %v, %s and %d (no flags or width): other "
    "verbs (%q, %5s, %x, ...) format differently in regopy"
)
_SAFE_SPRINTF = re.compile(r"^(?:[^%]|%%|%[vsd])*$", re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@dataclass(frozen=True)
class Refusal:
    file: str
    line: int
    column: int
    builtin: str
    why: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}:{self.column}: {self.builtin} {self.why}; the embedded "
            "engine refuses this bundle (serve it with OPSGATE_POLICY_ENGINE=opa-embedded "
            "or opa, or avoid the built-in)"
        )


@dataclass(frozen=True)
class _Token:
    kind: str  # "name", "string", "raw", "punct"
    text: str
    offset: int


def _tokens(source: str) -> list[_Token]:
    """Names, string literals and punctuation; comments dropped. Enough to find calls."""
    tokens: list[_Token] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "#":
            end = source.find("\n", i)
            i = n if end < 0 else end
        elif c == '"':
            j = i + 1
            while j < n and source[j] != '"':
                j += 2 if source[j] == "\\" else 1
            tokens.append(_Token("string", source[i + 1 : j], i))
            i = j + 1
        elif c == "`":
            j = source.find("`", i + 1)
            j = n if j < 0 else j
            tokens.append(_Token("raw", source[i + 1 : j], i))
            i = j + 1
        elif c.isalpha() or c == "_":
            match = _NAME.match(source, i)
            assert match is not None
            # A name right after a dot is a path into a value (data.x.lower), not a call.
            after_dot = bool(tokens) and tokens[-1].text == "." and tokens[-1].offset == i - 1
            tokens.append(_Token("path" if after_dot else "name", match.group(), i))
            i = match.end()
        elif c.isspace():
            i += 1
        else:
            tokens.append(_Token("punct", c, i))
            i += 1
    return tokens


def _arguments(tokens: list[_Token], open_index: int) -> list[list[_Token]]:
    """The top-level arguments of the call whose `(` is tokens[open_index]."""
    args: list[list[_Token]] = [[]]
    depth = 0
    for token in tokens[open_index + 1 :]:
        if token.kind == "punct" and token.text in "([{":
            depth += 1
        elif token.kind == "punct" and token.text in ")]}":
            if depth == 0:
                break
            depth -= 1
        elif token.kind == "punct" and token.text == "," and depth == 0:
            args.append([])
            continue
        args[-1].append(token)
    return args


def _literal(arg: list[_Token]) -> str | None:
    if len(arg) == 1 and arg[0].kind in {"string", "raw"}:
        return arg[0].text
    return None


def scan(modules: Iterable[tuple[str, str]]) -> list[Refusal]:
    """Every call of a refused built-in in these (name, source) modules."""
    refusals: list[Refusal] = []
    for name, source in modules:
        tokens = _tokens(source)
        for index, token in enumerate(tokens[:-1]):
            following = tokens[index + 1]
            if token.kind != "name" or following.text != "(":
                continue
            why = REFUSED_BUILTINS.get(token.text)
            if why is None and token.text == "sprintf":
                args = _arguments(tokens, index + 1)
                fmt = _literal(args[0]) if args else None
                why = None if fmt is not None and _SAFE_SPRINTF.match(fmt) else SPRINTF_WHY
            if why is not None:
                line = source.count("\n", 0, token.offset) + 1
                column = token.offset - (source.rfind("\n", 0, token.offset) + 1) + 1
                refusals.append(Refusal(name, line, column, token.text, why))
    return refusals


_REGO_ERROR = re.compile(
    r"\(error \d+:(?P<file>[^|()]*)\|(?P<offset>\d+)\|\d+\s*"
    r"\(errormsg \d+:(?P<message>[^\n]*?)\)\s*\(errorast",
)
_OPA_LOCATED = re.compile(r"(\S+\.rego:\d+: \S.*)")


def readable_rego_error(text: str, sources: dict[str, str]) -> str:
    """rego-cpp's error tree (`(rego-errorseq (error 8:a.rego|44|1 (errormsg ...` with byte
    offsets) as one line: `a.rego:4:23: message`, plus how many more errors there are."""
    errors = list(_REGO_ERROR.finditer(text))
    if not errors:
        return " ".join(text.split())[:300]
    first = errors[0]
    name, offset = first.group("file"), int(first.group("offset"))
    source = sources.get(name)
    where = name
    if source is not None and 0 <= offset <= len(source.encode()):
        # rego-cpp counts bytes; Python indexes characters.
        prefix = source.encode()[:offset].decode("utf-8", "replace")
        line = prefix.count("\n") + 1
        column = len(prefix) - (prefix.rfind("\n") + 1) + 1
        where = f"{name}:{line}:{column}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.group('message').strip()}{more}"


def opa_compile_error(modules: Iterable[tuple[str, str]]) -> str | None:
    """OPA's own compiler on these modules: its first error on one line, or None.

    regopy accepts some bundles OPA rejects (an unsafe variable, a rule defined twice, an
    unknown function); those then fail only at evaluation. Checking with OPA's compiler at
    load refuses them up front. None also when OPA's evaluator is not installed.
    """
    try:
        from opa_bindings import OpaEngine, OpaError
    except ImportError:
        return None
    with OpaEngine() as compiler:
        try:
            for name, source in modules:
                compiler.add_policy(name, source)
            compiler.eval_query("true")
        except OpaError as exc:
            return f"{readable_opa_error(exc.message or exc.code)} (OPA's compiler)"
    return None


def readable_opa_error(message: str) -> str:
    """OPA's multi-line error list as one line: the first `file:line: message`."""
    located = [m.group(1).strip() for m in map(_OPA_LOCATED.search, message.splitlines()) if m]
    if not located:
        return " ".join(message.split())[:300]
    more = f" (and {len(located) - 1} more)" if len(located) > 1 else ""
    return f"{located[0]}{more}"
