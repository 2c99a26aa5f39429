"""`opsgate server`: the HTTP API, the only door to the store for people, agents and CI."""
