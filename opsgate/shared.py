"""Small helpers every layer needs, defined once: the wall clock, one-line text, the
`{placeholder}` syntax and the cheap change check for a directory of files."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

# A placeholder in a step, a query or a param value: `{name}` with name `[a-z_][a-z0-9_]*`;
# `{2}` or `{service="x"}` (PromQL label matchers) are not placeholders.
PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")

# What a file signature holds per file: path, modification time (ns), size.
FileSignature = tuple[tuple[str, int, int], ...]


# "No upper bound" for a store query that takes one: later than any stored instant.
FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the default clock of everything that stamps a record."""
    return datetime.now(UTC)


def one_line(text: object, limit: int | None = 300) -> str:
    """`text` on one line (runs of whitespace, newlines included, become one space), cut
    to `limit` characters with an ellipsis (None: never cut): for reasons and error
    details kept in records or shown in a table cell."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


def files_signature(paths: Iterable[Path]) -> FileSignature:
    """Names, mtimes and sizes of `paths`: a stat per file, so it is cheap enough to check
    often; any edit that rewrites a file changes it. OSError propagates (a file vanished
    between listing and stat): callers treat that as changed."""
    out = []
    for path in paths:
        stat = path.stat()
        out.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(out)
