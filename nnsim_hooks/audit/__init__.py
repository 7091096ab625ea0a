"""Dataset audits."""
