"""``python -m wirebus``: the ``wirebus`` command."""

from wirebus.cli import main

main()
