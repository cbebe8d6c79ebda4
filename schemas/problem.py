"""RFC 9457 problem details, the body of every error that is not a delivery outcome."""

from pydantic import BaseModel, ConfigDict, Field


class FieldError(BaseModel):
    """One invalid part of a request."""

    loc: str = Field(description="where: a JSON path such as `recipients[1]`, or a header such as `X-Envelope-Sender`")
    message: str


class Problem(BaseModel):
    """`application/problem+json` (RFC 9457)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "no relay named 'outbnd'; configured: outbound",
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = Field(default=None, description="with 422: every problem found in the request")
