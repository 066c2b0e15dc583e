"""What the engine's admission check (``roma_service.engine.admission``) costs per request.

    python benchmarks/admission_check.py [--repeat 20000]

The middleware runs in vLLM's API server on every POST: it finds the router version a bound
body names (a substring test, then ``json.loads``) and compares it with what worker 0 last
published (one ``stat`` of the state file; the file is read again only when it changed). Both
are timed here, on a short completion body and a 2 KB chat body, bound as the gateway binds them.
"""

from __future__ import annotations

import json
import os
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from roma_service.engine.admission import VersionAdmission, named_version, publish
from roma_service.engine.binding import bind_request


def best(call: Callable[[], object], repeat: int) -> float:
    """Seconds per call: the best of 5 rounds (the least disturbed by other work)."""
    return min(timeit.repeat(call, number=repeat, repeat=5)) / repeat


def main(repeat: Annotated[int, typer.Option(help="calls per measurement")] = 20000) -> None:
    completion = {"model": "m", "prompt": "Question: what is 12 + 7? Answer:", "max_tokens": 64,
                  "temperature": 0.0, "stream": True}  # fmt: skip
    chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}], "max_tokens": 64}
    bodies = {}
    for name, body in (("completion", completion), ("chat", chat)):
        bodies[name] = json.dumps(bind_request(body, 3)).encode()
    table = Table(title=f"admission check, best of 5 rounds of {repeat} calls")
    for column in ("step", "body", "us per request"):
        table.add_column(column, justify="right" if column == "us per request" else "left")
    for name, raw in bodies.items():
        t = best(lambda raw=raw: named_version(raw), repeat)
        table.add_row("named_version (parse)", f"{name}, {len(raw)} B", f"{t * 1e6:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "slots.json"
        publish(state, ["0", "3", "4"])
        os.environ["ROMA_SLOT_STATE_FILE"] = str(state)
        middleware = VersionAdmission(None)
        t = best(middleware.servable, repeat)
        table.add_row("servable (stat, file unchanged)", "-", f"{t * 1e6:.2f}")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
