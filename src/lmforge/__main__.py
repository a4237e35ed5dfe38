"""`python -m lmforge ...`: the `lmforge` command (as launchers such as torchrun and accelerate call it)."""

from lmforge.cli import main

if __name__ == "__main__":
    main()
