"""Domain errors.  Services raise these; the one error middleware renders them in the protocol's form
(FHIR OperationOutcome under /fhir, DICOMweb status + reasons under /dicomweb, RFC 9457 problem details
elsewhere).  Messages name the offending field or parameter and never contain PHI values."""

from __future__ import annotations

from typing import Any, Mapping


class GatewayError(Exception):
    status: int = 500
    #: FHIR IssueType code (http://hl7.org/fhir/valueset-issue-type.html)
    issue_code: str = "exception"
    title: str = "Internal error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        issue_code: str | None = None,
        expression: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if issue_code is not None:
            self.issue_code = issue_code
        self.expression = expression or []
        self.headers = dict(headers or {})
        self.details = details


class BadRequest(GatewayError):
    status, issue_code, title = 400, "invalid", "Bad request"


class Unauthorized(GatewayError):
    status, issue_code, title = 401, "login", "Unauthorized"


class Forbidden(GatewayError):
    status, issue_code, title = 403, "forbidden", "Forbidden"


class NotFound(GatewayError):
    status, issue_code, title = 404, "not-found", "Not found"


class MethodNotAllowed(GatewayError):
    status, issue_code, title = 405, "not-supported", "Method not allowed"


class NotAcceptable(GatewayError):
    status, issue_code, title = 406, "not-supported", "Not acceptable"


class Conflict(GatewayError):
    status, issue_code, title = 409, "conflict", "Conflict"


class Gone(GatewayError):
    status, issue_code, title = 410, "deleted", "Gone"


class PreconditionFailed(GatewayError):
    status, issue_code, title = 412, "conflict", "Precondition failed"


class PayloadTooLarge(GatewayError):
    status, issue_code, title = 413, "too-costly", "Payload too large"


class UnsupportedMediaType(GatewayError):
    status, issue_code, title = 415, "not-supported", "Unsupported media type"


class Unprocessable(GatewayError):
    status, issue_code, title = 422, "invalid", "Unprocessable entity"


class ServiceUnavailable(GatewayError):
    status, issue_code, title = 503, "transient", "Service unavailable"


STATUS_ERRORS: dict[int, type[GatewayError]] = {
    cls.status: cls
    for cls in (
        BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, NotAcceptable, Conflict, Gone,
        PreconditionFailed, PayloadTooLarge, UnsupportedMediaType, Unprocessable, ServiceUnavailable,
    )
}
