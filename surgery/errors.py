"""One exception type for every problem a user can cause and fix."""


class SurgeryError(Exception):
    """A user-fixable problem. The message is one line that says what to do.

    The CLI prints it as ``error: <message>`` and exits with code 2. Any other
    exception is a bug in surgery and keeps its traceback.
    """


class ParityError(RuntimeError):
    """ONNX and torch outputs disagree beyond tolerance (the CLI exits 1); ``report`` has the numbers."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class Interrupted(SurgeryError):
    """Ctrl-C stopped a run; the message says what was saved. The CLI prints it and exits 130."""
