"""The web console: server-rendered pages behind OIDC login, served by `opsgate server`."""
