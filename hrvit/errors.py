"""Errors hrvit raises for bad input; the CLI prints their message and exits with status 2."""


class HrvitError(Exception):
    """A problem the user can fix (bad config, bad data); its message says what and where."""


class ConfigError(HrvitError):
    """A config key or value is wrong; the message names the key."""


class DataError(HrvitError):
    """An input file is missing, unreadable or inconsistent; the message names the file."""


PREEMPTED_EXIT = 75
"""Exit status of a run stopped by a signal with its last complete checkpoint intact (EX_TEMPFAIL): the sbatch
scripts requeue the job on it."""
