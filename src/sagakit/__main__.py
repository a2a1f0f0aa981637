"""``python -m sagakit``: the ``sagakit`` command."""

from sagakit.cli import main

if __name__ == "__main__":
    main(prog_name="sagakit")
