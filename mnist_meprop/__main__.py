"""``python -m mnist_meprop`` is the ``meprop`` command."""

from .cli import main

main()
