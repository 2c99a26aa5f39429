"""ACTION_ID: a click type that turns a unique id prefix into the full id, for every
command that takes an action id."""

from __future__ import annotations

from typing import Any

import click

from opsgate.errors import InvalidInput
from opsgate.ids import ID_LENGTH, normalize, resolve


class ActionIdType(click.ParamType):
    name = "ACTION_ID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from opsgate.cli.context import CliConfig

        if not isinstance(value, str):
            raise click.BadParameter("expected an action id", ctx=ctx, param=param)
        # The field named in errors is the one the user typed: `--action` or ACTION_ID.
        field = "action_id"
        if isinstance(param, click.Option) and param.opts:
            field = max(param.opts, key=len)
        config = ctx.find_object(CliConfig) if ctx is not None else None
        if config is None:  # no store to resolve against (used outside the opsgate group)
            return value
        if config.server_url is not None:
            # Client mode holds no store: the server resolves the prefix among the actions
            # this caller may read. A well-formed full id goes as typed (one trip fewer).
            prefix = normalize(value, field)
            if len(prefix) == ID_LENGTH:
                return prefix
            try:
                resolved: str = config.remote.resolve(prefix)
            except InvalidInput as exc:
                raise InvalidInput(field, exc.problem) from None
            return resolved
        return resolve(config.store, value, field)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[Any]:
        from opsgate.cli.completion import action_ids

        return list(action_ids(ctx, param, incomplete))


ACTION_ID = ActionIdType()
