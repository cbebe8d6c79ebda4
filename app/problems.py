"""Errors that are not delivery outcomes, rendered as application/problem+json."""

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.config import format_path
from schemas.problem import FieldError, Problem

logger = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem_doc(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers, self.errors = (
            status,
            detail,
            headers,
            errors,
        )


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: list[FieldError] | None = None,
) -> Response:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    return Response(
        body.model_dump_json(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def problem_for(request: Request, exc: Exception) -> Response:
    """The problem document for an exception out of a request: what every handler below
    answers, and what the deliver route, served ahead of FastAPI, answers too."""
    if isinstance(exc, ProblemError):
        return problem_response(request, exc.status, exc.detail, headers=exc.headers, errors=exc.errors)
    if isinstance(exc, StarletteHTTPException):
        return problem_response(request, exc.status_code, str(exc.detail), headers=exc.headers)
    if isinstance(exc, RequestValidationError):
        errors = [FieldError(loc=format_path(list(e["loc"])), message=str(e["msg"])) for e in exc.errors()]
        return problem_response(request, 422, "the request is invalid", errors=errors)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        500,
        "internal error; the delivery outcome is unknown, see the service log",
    )


async def _handle(request: Request, exc: Exception) -> Response:
    return problem_for(request, exc)


def install_problem_handlers(app: FastAPI) -> None:
    for kind in (ProblemError, StarletteHTTPException, RequestValidationError, Exception):
        app.add_exception_handler(kind, _handle)
