"""The one error type users see: a bad input, reported in one line with exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the CLI prints `vramplan: error: <message>` and exits 2.

    Library code raises it wherever a value the user chose cannot work, so that the message can
    name the problem and the valid choices at the place that knows them.
    """
