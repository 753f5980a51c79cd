"""``python -m app.cli``: the ``sagellm`` command."""

from app.cli import main

main()
