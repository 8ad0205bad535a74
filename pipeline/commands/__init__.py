"""One module per `imer` subcommand: ``pipeline/commands/demo_corpus.py`` -> ``imer demo-corpus``.

Each module's docstring's first line is its help; it defines ``add_arguments(parser)`` and
``main(args) -> int``. Keep imports of heavy libraries inside ``main``.
"""
