"""`opsgate demo`: a demo service, a real Prometheus and the whole loop on one machine."""

from __future__ import annotations
