"""sefe_fast.model."""
