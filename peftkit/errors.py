"""The one exception type users see: a one-line message naming the problem and the fix."""


class PeftkitError(Exception):
    """A user-facing error; the CLI prints its message on one line without a traceback."""


class ConfigError(PeftkitError):
    """A preset, recipe or option is malformed."""


class AdapterError(PeftkitError):
    """An adapter cannot be applied, loaded, saved or merged."""


class ModelError(PeftkitError):
    """A model cannot be found or loaded."""
