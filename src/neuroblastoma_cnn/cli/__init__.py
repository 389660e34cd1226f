"""The command line: ``commands`` is the ``neuroblastoma-cnn`` command (predict, prune, study;
``study_command`` is ``neuroblastoma-cnn study``).

Two names are looked up here: the console script ``neuroblastoma_cnn.cli:main`` and the click
group Kedro imports to find project commands, ``neuroblastoma_cnn.cli.cli``.
"""

from neuroblastoma_cnn.cli.commands import cli, main

__all__ = ["cli", "main"]
