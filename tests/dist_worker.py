"""A torchrun entry point for tests/test_distributed_cli.py: the ``main`` of ``baselines/<method>.py``
(``DM_TEST_METHOD``: dm, the default, dance or idm), with three test-only switches in the
environment: ``DM_TEST_STOP_AT=N`` stops every rank on reaching iteration N (as a Ctrl-C there
would), so a resume test needs no timing; ``DM_TEST_RANDOM_EXPERTS`` uses the random stand-in
experts of ``tests/conftest.py`` (no training); ``DM_TEST_EXIT_LOG=DIR`` writes
``DIR/exit-rank<r>``, the time each rank left ``main``. Not collected by pytest."""
import importlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import killed_at, random_stand_in_experts  # noqa: E402

HOSTS = {"dm": ("dm_plugins", "DMHost"), "dance": ("adapters.dance", "DANCEHost"),
         "idm": ("adapters.idm", "IDMHost")}

if __name__ == "__main__":
    method = os.environ.get("DM_TEST_METHOD", "dm")
    cli = importlib.import_module(f"baselines.{method}")
    if os.environ.get("DM_TEST_RANDOM_EXPERTS"):
        from baselines.harness import expert_cache
        expert_cache.load_or_train_experts = random_stand_in_experts
    stop_at = os.environ.get("DM_TEST_STOP_AT")
    if stop_at is None:
        code = cli.main(sys.argv[1:])
        if os.environ.get("DM_TEST_EXIT_LOG"):  # when this rank left main (ns since the epoch)
            path = Path(os.environ["DM_TEST_EXIT_LOG"]) / f"exit-rank{os.environ['RANK']}"
            path.write_text(str(time.time_ns()))
        sys.exit(code)
    module, name = HOSTS[method]
    with killed_at(getattr(importlib.import_module(module), name), int(stop_at)):
        sys.exit(cli.main(sys.argv[1:]))
