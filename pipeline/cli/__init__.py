"""The command line: thin click commands, one module per stage, that parse options, call one library
function and render its result (:mod:`pipeline.cli.main` holds the ``pipeline`` group).

May import every stage of :mod:`pipeline`, :mod:`students` and :mod:`teachers` (choice lists come from
their registries). Nothing imports the CLI: the manifest runner receives the command group from it.
"""
