"""``megaflow flower``: Flower for the fleet, with basic auth from settings and persistent state.

Flower is started in this process on a Celery app built from settings (no app module path, no
credentials on a command line where ``ps`` would show them). Flower and Tornado are imported only
when it runs. Senders put the short form of a task's arguments in the message (Celery's
``argsrepr``, ``megaflow.core.wire.task_argsrepr``), so Flower shows ``ep=<id> step=<k> host=<host>``
rather than a dict of container details.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

from megaflow.core.errors import ConfigError
from megaflow.core.settings import Settings

log = logging.getLogger(__name__)

TASKS_COLUMNS = "name,args,state,received,started,runtime,worker,uuid"
STATE_SAVE_INTERVAL_MS = 60_000  # a crashed Flower loses at most a minute of task history


def flower_options(settings: Settings, *, port: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Flower's option values for this fleet; fails with a ConfigError when credentials are missing."""
    user = settings.flower_user
    password = settings.flower_password.get_secret_value() if settings.flower_password else ""
    if not user or not password:
        raise ConfigError(
            "Flower needs basic-auth credentials: set MEGAFLOW_FLOWER_USER and MEGAFLOW_FLOWER_PASSWORD "
            "(or flower_user / flower_password in the MEGAFLOW_CONFIG file)"
        )
    if ":" in user:
        raise ConfigError("MEGAFLOW_FLOWER_USER must not contain ':' (HTTP basic auth splits user and password there)")
    state = Path(settings.state_dir)
    return {
        "port": settings.flower_port if port is None else port,
        "address": settings.flower_address if address is None else address,
        "basic_auth": [f"{user}:{password}"],
        "persistent": True,
        "db": str(state / "flower.db"),
        "state_save_interval": STATE_SAVE_INTERVAL_MS,
        "tasks_columns": TASKS_COLUMNS,
    }


def run_flower(settings: Settings, *, port: int | None = None, address: str | None = None) -> None:
    """Run Flower in the foreground until SIGTERM / Ctrl-C (state is saved on the way out)."""
    values = flower_options(settings, port=port, address=address)
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)

    from flower.app import Flower
    from flower.command import apply_env_options, extract_settings, setup_logging
    from flower.urls import settings as web_settings
    from tornado.options import options

    from megaflow.workers.celery_app import create_app

    apply_env_options()  # FLOWER_* variables still tune what MegaFlow does not set
    for name, value in values.items():
        setattr(options, name, value)
    extract_settings()
    setup_logging()
    capp = create_app(settings)
    flower_app = Flower(capp=capp, options=options, **web_settings)

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %s: stopping Flower", signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        bound = flower_app.start_http_server()
    except OSError as exc:
        raise ConfigError(
            f"Flower cannot listen on {values['address']}:{values['port']}: {exc.strerror or exc}; "
            "pick another port with --port / MEGAFLOW_FLOWER_PORT"
        ) from None
    log.info(
        "Flower on http://%s:%s/ (basic auth user %r, state in %s)",
        values["address"],
        bound,
        settings.flower_user,
        values["db"],
    )
    try:
        flower_app.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        flower_app.stop()  # saves the persistent state
