"""The errors a command line reports as one line (exit code 2) instead of a traceback."""
from dm_plugins import ExpertError, PluginError

from .common import UsageError
from .datasets import DatasetError
from .runs import RunError
from .synset import SynSetError

USER_ERRORS = (PluginError, ExpertError, DatasetError, SynSetError, RunError, UsageError)
