"""Analysis reads run dirs only (spec.yaml, metrics.jsonl, status.json); it never imports an
engine. Pure functions: run dirs -> one tidy DataFrame -> figures and tables."""
