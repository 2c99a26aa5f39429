"""Who a request comes from: principals, API tokens (and later OIDC)."""
