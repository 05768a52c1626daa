"""Feature dashboards: one pass of the host model over held-out text, per-feature statistics and examples."""
