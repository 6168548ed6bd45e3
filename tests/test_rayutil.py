"""The local Ray the stages start: worker processes run the project's set-up hook."""

from __future__ import annotations

import logging


def test_local_ray_workers_quieten_the_state_api_poller(ray_local):
    from slimrec.rayutil import STATE_API_LOGGERS

    @ray_local.remote(num_cpus=0)
    def levels():
        return [logging.getLogger(n).level for n in STATE_API_LOGGERS]

    assert ray_local.get(levels.remote()) == [logging.ERROR] * len(STATE_API_LOGGERS)
    # the driver's own loggers are left as they are
    assert logging.getLogger(STATE_API_LOGGERS[0]).level != logging.ERROR
