"""Privacy records, their accounting, the signed ledger, key signing, a site's policy and the run's privacy plan."""
