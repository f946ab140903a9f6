"""Every error backfill raises on purpose.

    BackfillError
     ├── ConfigError                 bad settings or config file; the process refuses to start
     ├── TokenLimitExceeded          a batch would take its tenant over the enqueued-token limit (SPEC §3)
     │    └── TokenRateExceeded      ... or over its batch tokens per minute
     ├── RunStateError               `backfill run`: its state directory is busy or belongs to another input
     ├── BlobStoreUnavailable        the blob store (S3) failed or did not answer: retry later, nothing is lost
     ├── ClientError                 a client command (`backfill submit`, …) got no answer it can use
     │    ├── ServerUnreachable      connection refused, unknown host, timeout
     │    └── ServerRejected         the server answered with an error envelope (its status and message)
     ├── ApiError                    a client mistake or state conflict, shown in the error envelope
     │    ├── InvalidRequest         400  the request itself is wrong (`param` names the field)
     │    ├── AuthenticationFailed   401  missing or unknown API key
     │    ├── PermissionDenied       403  a tenant key on the admin API
     │    ├── NotFound               404  unknown id, or one that belongs to another tenant
     │    ├── Conflict               409  legal request, wrong state (cancel a finished batch, …)
     │    │    └── IdempotencyKeyInUse     a create with this Idempotency-Key is still being served: retry
     │    ├── PayloadTooLarge        413  upload or body over its size limit
     │    └── QuotaExceeded          429  a create would take its tenant over a quota (docs/tenants.md)
     │         └── FlexUnavailable   429  a flex call found no harvested capacity in `flex_timeout_s`
     └── BackendError                a backend call went wrong without a usable HTTP answer
          ├── BackendTimeout         no answer within the per-request timeout
          └── BackendUnavailable     connection refused/reset, or an answer that is not a JSON object

Routes only ever see these; `backfill.http.errors` maps `ApiError` to HTTP in one table. Adapters translate
foreign exceptions (httpx, SQLAlchemy, …) into them at the boundary.
"""

from __future__ import annotations


class BackfillError(Exception):
    """Something went wrong in backfill."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(BackfillError):
    """The configuration is invalid."""


class TokenLimitExceeded(BackfillError):
    """The tenant's enqueued-token limit for this model would be exceeded."""

    def __init__(self, *, enqueued: int, wanted: int, limit: int) -> None:
        super().__init__(
            f"Enqueued token limit reached: this batch needs about {wanted} prompt tokens, {enqueued} are already "
            f"enqueued, the limit is {limit}. Wait for batches to finish and retry."
        )
        self.enqueued, self.wanted, self.limit = enqueued, wanted, limit


class TokenRateExceeded(TokenLimitExceeded):
    """The tenant's batch tokens per minute would be exceeded."""

    def __init__(self, *, started: int, wanted: int, limit: int) -> None:
        BackfillError.__init__(
            self,
            f"Batch token rate limit reached: this batch needs about {wanted} prompt tokens, batches started in the "
            f"last minute hold {started}, the limit is {limit} a minute. Retry in a minute.",
        )
        self.enqueued, self.wanted, self.limit = started, wanted, limit


class RunStateError(BackfillError):
    """The state directory of `backfill run` cannot be used."""


class BlobStoreUnavailable(BackfillError):
    """The blob store could not be reached or failed; the operation can be tried again."""


class ClientError(BackfillError):
    """The backfill server gave no answer the client can use."""


class ServerUnreachable(ClientError):
    """The backfill server could not be reached."""


class ServerRejected(ClientError):
    """The backfill server refused the request."""

    def __init__(self, message: str | None = None, *, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code


class ApiError(BackfillError):
    """The request could not be served."""

    status_code = 400
    error_type = "invalid_request_error"
    retryable = False  # whether the SDKs may retry it (else `x-should-retry: false` for 4xx)

    def __init__(self, message: str | None = None, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class InvalidRequest(ApiError):
    """The request is invalid."""


class AuthenticationFailed(ApiError):
    """Incorrect API key provided."""

    status_code = 401
    error_type = "authentication_error"


class PermissionDenied(ApiError):
    """This operation needs an admin API key."""

    status_code = 403
    error_type = "permission_error"


class NotFound(ApiError):
    """No such object."""

    status_code = 404


class Conflict(ApiError):
    """The object is not in a state that allows this."""

    status_code = 409


class IdempotencyKeyInUse(Conflict):
    """A request with this Idempotency-Key is still being served; retry shortly to get its answer."""

    retryable = True


class PayloadTooLarge(ApiError):
    """The request body is larger than allowed."""

    status_code = 413


class QuotaExceeded(ApiError):
    """The tenant's enqueued-token limit would be exceeded; retry once earlier batches have finished."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class FlexUnavailable(QuotaExceeded):
    """No capacity was free to run this flex request in time; retry later, or send it without `service_tier: flex`."""

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None) -> None:
        super().__init__(message, code="resource_unavailable", retry_after_s=retry_after_s)


class BackendError(BackfillError):
    """The backend call failed without a usable answer."""

    code = "backend_unavailable"


class BackendTimeout(BackendError):
    """The backend did not answer within the request timeout."""

    code = "timeout"


class BackendUnavailable(BackendError):
    """The backend could not be reached or answered with something that is not a JSON object."""
