"""Process groups and launcher environments (sequence parallelism arrives here later)."""
