"""The one exception of the analysis package."""


class AnalysisError(ValueError):
    """Bad input for an analysis step; the message says which value and what is allowed.

    The console scripts print it as ``error: <message>`` and exit with status 2.
    """
