"""sefe_fast.train."""
