"""Start the application on uvicorn."""
from __future__ import annotations

from ..errors import UsageError
from .limits import ServeConfig, is_loopback


def make_server(head, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig = ServeConfig()):
    """A ``uvicorn.Server`` for the application (``.run()`` blocks; ``should_exit = True`` stops it); ``head`` is a
    ``TalkingHead`` or an engine (``serving.engines``)."""
    import uvicorn

    from .app import create_app

    if not is_loopback(host) and not config.token:
        raise UsageError(f"listening on {host} (beyond loopback) needs a bearer token: --token TOKEN "
                         "or SADTALKER_RT_TOKEN.")
    app = create_app(head, config)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", ws="websockets-sansio",
                                         ws_max_size=config.max_message_bytes + 1024, lifespan="off"))
