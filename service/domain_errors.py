"""Domain errors: what the service layer raises. Routers never catch them one by one; the
handler in `service.problems` turns each into a problem response with its `status`."""


class DomainError(Exception):
    """A rule of the domain was broken; `status` is the HTTP status it maps to."""

    status = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    status = 409


class PreconditionFailed(DomainError):
    status = 412


class BadRequest(DomainError):
    status = 400


class PreconditionRequired(DomainError):
    status = 428
