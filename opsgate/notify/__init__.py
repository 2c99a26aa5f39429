"""Notifications: a transactional outbox in the store and a delivery loop in the server."""
