"""opsgate: a policy-guarded action executor for production operations."""

__version__ = "0.1.0"
