"""`python -m sefe_fast.profile_memory`: the documented entry point of `sefe_fast.bench.profile_memory`."""

from sefe_fast.bench.profile_memory import main

if __name__ == "__main__":
    raise SystemExit(main())
