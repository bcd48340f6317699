"""The engine's own failures. The engine imports nothing from the rest of `pipeline`; the stages show an
EngineError as one line (`pipeline.errors.cli_main`), like their own UserErrors."""


class EngineError(ValueError):
    """A setting or input the engine refuses (unknown architecture, optimizer, schedule or device; a GPU
    that cannot run; a bad thread count). The message is one sentence fit to show to the user."""


def with_context(exc, context):
    """`exc` (a ValueError) as a new one of the same kind with "context: " in front: an EngineError stays one
    (a stage shows it as one line), any other ValueError is a ValueError."""
    return (EngineError if isinstance(exc, EngineError) else ValueError)(f"{context}: {exc}")
