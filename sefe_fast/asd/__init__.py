"""sefe_fast.asd."""
