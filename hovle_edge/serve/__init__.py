"""`hovle-edge serve`: an OpenAI-compatible chat-completions server for an exported model folder.
Needs the [serve] extra (starlette, uvicorn); like the rest of the runtime it never imports torch."""

from __future__ import annotations

from hovle_edge.errors import HoVLEError
from hovle_edge.serve.settings import ServeSettings


def serve(settings: ServeSettings, log_level: str = "info") -> None:
    """Load the model, then answer on settings.host:settings.port until interrupted."""
    try:
        import uvicorn

        from hovle_edge.serve.app import create_app
    except ImportError as e:
        raise HoVLEError(f"hovle-edge serve needs the [serve] extra ({e}): pip install 'hovle-edge[serve]'") from e
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
