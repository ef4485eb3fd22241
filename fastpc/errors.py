"""The one exception type the command line turns into a one-line message and exit status 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, run folder).

    The message must be one line that names what was wrong and what would be accepted.
    `fastpc` commands print it as ``error: <message>`` and exit with status 2.
    """
