"""The engine's own failures. The engine imports nothing from the rest of `pipeline`; the stages show an
EngineError as one line (`pipeline.errors.cli_main`), like their own UserErrors."""


class EngineError(ValueError):
    """A setting or input the engine refuses (unknown architecture, optimizer, schedule or device; a GPU
    that cannot run; a bad thread count). The message is one sentence fit to show to the user."""
