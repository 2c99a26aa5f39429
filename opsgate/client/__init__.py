"""Client mode: the CLI's verbs through `opsgate server` (OPSGATE_URL + OPSGATE_TOKEN)."""
