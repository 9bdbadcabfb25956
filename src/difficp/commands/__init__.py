"""Sub-commands of the ``difficp`` command line, one module each (see :mod:`difficp.cli`)."""
