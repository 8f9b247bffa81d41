"""The test suite: a package (run with the repository root on sys.path, see pyproject's pytest options),
so that tests and the scripts they spawn share helpers as ``tests.training.standins``."""
