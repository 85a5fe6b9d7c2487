"""`python -m qpissa`: the `qpissa` command, for launchers that start a module (`accelerate launch -m`)."""

from qpissa.cli import main_entry

if __name__ == "__main__":
    main_entry()
