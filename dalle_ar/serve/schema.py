"""Request body of POST /v1/images/generations and errors in OpenAI's shape."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_N = 10              # OpenAI's limit for n
MAX_PROMPT_CHARS = 1000


class ImageRequest(BaseModel):
    """OpenAI Images API fields, then this server's extensions (extra fields of the openai client:
    `extra_body={...}`). Unknown fields and wrong types are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(1, ge=1, le=MAX_N)
    size: Optional[str] = None                  # "WxH": the model's size only
    response_format: Literal["url", "b64_json"] = "url"
    model: Optional[str] = None
    user: Optional[str] = None
    quality: Optional[Literal["standard", "auto"]] = None
    output_format: Optional[Literal["png"]] = None
    # extensions
    candidates: Optional[int] = Field(None, ge=1)  # sampled; the best n are kept by the reranker
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    guidance_scale: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    temperature: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    top_k: Optional[int] = Field(None, ge=1)
    top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)


class APIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with its HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


def validation_error(errors: list) -> APIError:
    """FastAPI's RequestValidationError list -> one OpenAI-style 400 naming the first bad field."""
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "json_invalid" or not loc:
        return APIError(400, "We could not parse the JSON body of your request: send a JSON object "
                             "with Content-Type: application/json.", None, "invalid_json")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    got = e.get("input")
    got = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return APIError(400, f"Invalid value for '{param}': {e.get('msg', 'invalid')}{got}.", param, "invalid_value")
