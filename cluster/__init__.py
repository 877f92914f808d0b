"""drafthorse control plane: CLI, gateway, router, sessions, settings."""
