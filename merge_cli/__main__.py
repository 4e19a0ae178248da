"""`python -m merge_cli` runs the command line (also what torchrun's `-m merge_cli` starts)."""

from merge_cli.cli import main

if __name__ == "__main__":
    main()
