"""Training drafter heads: the target writes its own data (selfdistill), heads learn from it (train)."""
