"""What `service.db` raises when a session is asked for where there is none."""


class MissingSessionError(Exception):
    """`db.session` was read where no session scope is open."""

    def __init__(self, name: str = "db", block: str = "with") -> None:
        # `block`: how a scope is opened in the caller's mode - "with" or "async with".
        super().__init__(
            f"No database session is open here. Inside a request, add DBSessionMiddleware to "
            f"the app (requests to its `sessionless_paths` get no session); anywhere else "
            f"(scripts, jobs, tests) open one with `{block} {name}():`."
        )


class SessionNotInitialisedError(Exception):
    """A session was asked for before any engine was configured."""

    def __init__(self, name: str = "db") -> None:
        super().__init__(
            f"No database engine is configured for `{name}`. Call "
            f"`{name}.configure(url_or_engine)` first, or add DBSessionMiddleware(app, "
            f"db_url=...) to the app and let it serve a request."
        )

