"""The gateway: the public door (FastAPI). One folder per API area, each with protocol.py
(bodies), serving.py (logic) and api_router.py (routes): ``completions/`` (the OpenAI API,
proxied), ``routers/`` (deploy and roll back router patches), ``health/`` (probes, metrics)."""

from roma_service.gateway.app import create_app

__all__ = ["create_app"]
