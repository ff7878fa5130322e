"""offbeat sandbox service: Runs untrusted code in isolated, resource-limited workers."""
