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
    kwargs = dict(ignore_reinit_error=True, log_to_driver=to_driver, include_dashboard=False)
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=to_driver)
    else:
        log.info("starting local Ray")
        ray.init(num_cpus=num_cpus, **kwargs)
    # Ray Data progress bars go to stderr; keep them, but stop per-operator verbose logs.
    ray.data.DataContext.get_current().enable_progress_bars = True
