"""The one exception type the command line turns into a clear message and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix: bad config, bad data, missing or stale artifacts.

    The message must name the file, row or key at fault. The CLI prints it without a traceback
    and exits with status 2; anything else is a bug and keeps its traceback.
    """
