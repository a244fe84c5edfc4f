"""`python -m sefe_fast.train coin ...` and `torchrun --nproc_per_node N -m sefe_fast.train coin ...`."""

from sefe_fast.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
