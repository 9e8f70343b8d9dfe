"""Clean-up that no failure can cut short: every step runs, and the first failure is raised once at the end.

Erasing plaintext and keys must not depend on the audit log: a log whose file
failed (disk full) raises at every record, and a loop that records as it erases
would stop at its first record. Each step of such a loop runs inside
``Cleanup.step()``; ``Cleanup.done()`` raises the first failure once every step
has run.
"""

from __future__ import annotations

import contextlib

__all__ = ["Cleanup"]


class Cleanup:
    """Collects the failures of steps that must all run; ``done()`` raises the first one."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    @contextlib.contextmanager
    def step(self):
        """Run the block; a failure is kept (the first one) instead of leaving the loop."""
        try:
            yield
        except BaseException as exc:    # also KeyboardInterrupt: raised once the rest is erased
            if self.error is None:
                self.error = exc

    def done(self) -> None:
        """Raise the first failure of the steps (none: return)."""
        error, self.error = self.error, None
        if error is not None:
            raise error
