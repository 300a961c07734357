"""Errors a user can act on: the CLI prints them without a traceback."""


class PipelineError(Exception):
    """A failure with a message that says what is wrong and where; exit code 2."""
