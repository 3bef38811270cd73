"""The one error type the routes turn into a 4xx JSON reply."""

from __future__ import annotations

from typing import Optional


class RequestError(ValueError):
    """A client mistake: HTTP ``status`` with a message naming ``field`` (the offending
    request field, or None when the whole request is at fault)."""

    def __init__(self, message: str, field: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status

    def payload(self) -> dict:
        """JSON body: Megatron's CLI reads ``message``; OpenAI clients read ``error``."""
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "message": self.message,
            "error": {"message": self.message, "type": error_type, "param": self.field, "code": self.status},
        }
