"""The engine: the only code in the project that touches vLLM.

* :mod:`.extension` - the worker extension mixed into vLLM's workers (apply / read back routers).
* :mod:`.process` - starting and stopping the stock vLLM OpenAI server as a child process.
* :mod:`.client` - the async client the gateway uses (health, apply, state, pause/resume).
"""
