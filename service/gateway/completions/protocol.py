"""What the proxy adds to the OpenAI protocol: which router version served each response.

* header ``X-Router-Version: <n>`` on every response (streamed or not);
* header ``X-Router-Version-Changed: <n>-><m>`` on a non-streamed response generated across a
  swap (``immediate`` policy; ``drain`` never produces one); ``<m>`` is ``?`` when the swap was
  still under way as the response ended;
* streamed responses end with SSE comment lines before ``data: [DONE]``:
  ``: x-router-version <n>`` always, and ``: x-router-version-changed <n>-><m>`` when the stream
  spanned a swap. SSE clients (the openai package included) ignore comment lines.

Request bodies are passed to the engine byte for byte; the proxy only reads ``stream``.
"""

from __future__ import annotations

VERSION_HEADER = "X-Router-Version"
CHANGED_HEADER = "X-Router-Version-Changed"
DONE = b"data: [DONE]\n\n"


def version_comment(version: int | None) -> bytes:
    return f": x-router-version {version}\n\n".encode()


def changed_comment(old: int | None, new: int | None) -> bytes:
    return f": x-router-version-changed {old}->{new}\n\n".encode()
