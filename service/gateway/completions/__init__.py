"""The OpenAI API, proxied to the engines: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models`` (and ``/v1/models/{id}``), plus vLLM's ``/tokenize``, ``/detokenize`` and
``/version``."""
