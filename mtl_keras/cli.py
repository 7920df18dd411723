"""What every entry point (``experiments/*.py``) shares: its log format, and a user's mistake as one line
``PROG: error: MESSAGE`` with exit status 2, as argparse does (the traceback with ``-v 1`` or ``MTL_KERAS_DEBUG=1``;
programming errors keep theirs). Standard library and absl only: the entry points load it before TensorFlow.
"""

import logging
import os
import sys
import traceback

# What the library raises for a user's mistake: bad values, and files missing, in the way or unreadable.
USER_ERRORS = (ValueError, OSError)
USAGE_EXIT_CODE = 2
LOG_FORMAT = "%(asctime)s %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def debug_requested():
    """True with ``MTL_KERAS_DEBUG=1`` or absl's ``--verbosity`` >= 1 (``-v 1``)."""
    if os.environ.get("MTL_KERAS_DEBUG", "") not in ("", "0"):
        return True
    try:
        from absl import flags

        return flags.FLAGS.is_parsed() and flags.FLAGS.verbosity >= 1
    except Exception:  # noqa: BLE001 - no absl, or flags not defined: not a debug run
        return False


def setup_logging():
    """INFO lines as ``HH:MM:SS message`` through absl's handler (absl's default prefixes thread ids and files)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    logging.getLogger().setLevel(logging.INFO)


def one_line(error):
    """The error's message on one line (a chained cause after a semicolon)."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message = f"{message} ({error.filename})"
    return message


def report(prog, error, stream=None):
    """Writes ``PROG: error: MESSAGE`` and a hint for the traceback; returns the exit status."""
    stream = stream or sys.stderr
    stream.write(f"{prog}: error: {one_line(error)}\n")
    stream.write(f"{prog}: (run with --verbosity 1 or MTL_KERAS_DEBUG=1 for the traceback)\n")
    stream.flush()
    return USAGE_EXIT_CODE


def _flags_parser(prog):
    def parse(argv):
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            sys.stderr.write(f"{prog}: error: {one_line(e)} (see {prog} --help)\n")
            sys.exit(USAGE_EXIT_CODE)

    return parse


def run(main, argv=None):
    """``absl.app.run(main)`` with the log format above, flag errors and user errors as one line and exit status 2."""
    from absl import app

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mtl_keras"

    def wrapped(args):
        setup_logging()
        try:
            return main(args)
        except USER_ERRORS as e:
            if debug_requested():  # the traceback asked for, and still a user mistake's exit status
                traceback.print_exc()
                sys.exit(USAGE_EXIT_CODE)
            sys.exit(report(prog, e))

    app.run(wrapped, argv=argv, flags_parser=_flags_parser(prog))
