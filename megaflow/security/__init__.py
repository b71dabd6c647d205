"""Access control: Redis ACL users per role, per-role secrets in worker environments."""
