"""`python -m sefe_fast.profile_memory`: the documented entry point of `sefe_fast.bench.profile_report`."""

from sefe_fast.bench.profile_report import main

if __name__ == "__main__":
    raise SystemExit(main())
