"""privseg's user-facing error types, in a module that imports nothing.

The CLI's sub-apps import these when the CLI is imported, to catch them in their commands.
Defined here rather than in :mod:`privseg.config` (pydantic models, ~0.25 s to import), they
let ``privseg privacy`` and ``--help`` start without the config machinery they never use.
"""


class ConfigError(ValueError):
    """A config that does not validate; the message names the offending keys."""


class SweepError(ValueError):
    """A sweep file that cannot be expanded; the message names the file and the key."""
