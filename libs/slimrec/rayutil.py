"""Starting or joining Ray."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) when given, else start a local Ray; no-op if already up.

    Local Ray gets the project's package on its workers through the installed
    (editable) package, so no runtime_env upload is needed.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # worker output (training epochs, generation progress) reaches the terminal unless SLIMREC_RAY_QUIET=1
    to_driver = os.environ.get("SLIMREC_RAY_QUIET", "0") != "1"
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=to_driver)
    else:
        log.info("starting local Ray")
        # No dashboard here (memory, start-up time); its State API is then missing, which Ray Train's
        # placement-group cleaner reports once a second for the whole training job. Workers quieten
        # that one logger (a cluster has a dashboard, so it is left alone there).
        ray.init(num_cpus=num_cpus, ignore_reinit_error=True, log_to_driver=to_driver, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": "slimrec.rayutil.quiet_state_api_warnings"})
    # Ray Data progress bars go to stderr; keep them, but stop per-operator verbose logs.
    ray.data.DataContext.get_current().enable_progress_bars = True


# Ray Train's detached cleaner polls the State API (served by the dashboard) every second.
STATE_API_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_warnings() -> None:
    """Worker set-up hook of the local Ray: only errors from the loggers that need the dashboard."""
    for name in STATE_API_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
