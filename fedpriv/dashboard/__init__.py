"""`fedpriv dashboard`: a live, read-only page over a run directory (operator tooling, not a role)."""
