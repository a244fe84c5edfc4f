"""sefe_fast.data."""
