"""The ``clicooper`` command line."""
