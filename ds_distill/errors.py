"""The one exception users see for a problem they can fix; the CLI prints it as one line and exits 2."""


class ConfigError(ValueError):
    """A configuration or input problem, worded as the problem and its fix."""
