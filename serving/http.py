"""The HTTP endpoint of a controller, on FastAPI (served by uvicorn: ``python serve.py run=<run> http.port=8000``).

Routes:

- ``GET /health``: ``{"status": "ok", "agent", "env", "run", "budget_ms", "achievable_range_ms"}``.
- ``POST /answer``: one request, either ``multipart/form-data`` (an ``image`` file upload, a
  ``question`` field, an optional ``budget`` field) or a JSON body ``{"question", "image": <base64 of
  the image file>, "budget"}`` (plus the optional ``answers``, ``type``, ``id`` of a requests-file
  line). Returns the :class:`~serving.controller.Answer` as JSON: ``answer``, ``knobs``,
  ``budget_ms``, ``predicted_ms``, ``estimated_ms``, ``measured_ms``, ``model_ms``,
  ``within_budget``, and ``warning`` when the budget lies outside the achievable range.

Bad input is a 4xx with ``{"error": "<one line naming the value and what is accepted>"}``: 400 for
a missing field, an unreadable image or a bad budget, 413 for an image over ``max_image_bytes``,
415 for another content type. An unexpected failure while answering is a 500 with one line; the
server keeps serving. The model is loaded once (the controller) and answers one request at a time.
"""

# no ``from __future__ import annotations``: FastAPI reads the route's annotations as objects
from typing import Any

from serving.controller import Controller
from serving.requests import RequestError, decode_image_bytes, request_from_fields

#: the largest image accepted by default (encoded bytes)
MAX_IMAGE_BYTES = 16 * 1024 * 1024


def create_app(controller: Controller, max_image_bytes: int = MAX_IMAGE_BYTES):
    """The FastAPI application serving ``controller`` (see the module docstring)."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from starlette.datastructures import UploadFile

    app = FastAPI(title="knobgym controller", description=__doc__.split("\n\n")[0])
    needs_image = controller.env.space.has_vision

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        lo, hi = controller.achievable_range_ms
        return {"status": "ok", "agent": controller.agent.name, "env": controller.source.get("env"),
                "run": controller.source.get("run"), "budget_ms": controller.budget_ms,
                "achievable_range_ms": [round(lo, 3), round(hi, 3)]}

    @app.post("/answer")
    async def answer(request: Request):
        content_type = request.headers.get("content-type", "")
        try:
            if content_type.startswith("multipart/form-data"):
                form = await request.form()
                upload = form.get("image")
                image = None
                if isinstance(upload, UploadFile):
                    data = await upload.read(max_image_bytes + 1)
                    if len(data) > max_image_bytes:
                        return error(413, f"the image is larger than {max_image_bytes} bytes; accepted: at most that")
                    image = decode_image_bytes(data, "the uploaded image")
                elif upload is not None:
                    raise RequestError("image is a form field, not a file; accepted: an image file upload "
                                       "(multipart), or a JSON body with the image in base64")
                fields = {k: v for k, v in form.items() if k != "image"}
                parsed = request_from_fields(fields, "the request", image=image, needs_image=needs_image)
            elif content_type.startswith("application/json"):
                body = await request.body()
                if len(body) > 2 * max_image_bytes:
                    return error(413, f"the request body is larger than {2 * max_image_bytes} bytes")
                try:
                    import json

                    fields = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    raise RequestError("the body is not valid JSON; accepted: a JSON object with question, "
                                       "image (base64) and budget") from None
                parsed = request_from_fields(fields, "the request", needs_image=needs_image)
            else:
                return error(415, f"content type {content_type or '(none)'!r} is not accepted; accepted: "
                                  f"multipart/form-data (an image upload) or application/json (image in base64)")
            result = await run_in_threadpool(controller.answer, parsed)
        except ValueError as exc:  # RequestError, a bad budget, an image the model cannot take
            return error(400, str(exc))
        except Exception as exc:  # the server keeps serving; the caller gets one line
            return error(500, f"unexpected {type(exc).__name__} while answering: {exc}")
        return result.as_dict()

    return app


def serve(controller: Controller, host: str = "127.0.0.1", port: int = 8000, *, on_ready=None) -> None:
    """Serve ``controller`` with uvicorn until interrupted; ``port=0`` takes any free port.
    ``on_ready(port)`` is called with the bound port before the first request is accepted."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"http.host={host} http.port={port} cannot be bound ({exc.strerror or exc}); accepted: a "
                         f"free port on an address of this machine (http.port=0: any free port)") from None
    server = uvicorn.Server(uvicorn.Config(create_app(controller), log_level="warning", access_log=False))
    if on_ready is not None:
        on_ready(sock.getsockname()[1])
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
