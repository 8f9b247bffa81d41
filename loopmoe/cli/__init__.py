"""Command-line interface of LoopMoE (``loopmoe`` or ``python -m loopmoe``)."""
