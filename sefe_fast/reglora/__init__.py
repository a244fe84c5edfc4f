"""sefe_fast.reglora."""
