"""sefe_fast.methods."""
