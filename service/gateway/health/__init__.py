"""``/health``, ``/ready`` and ``/metrics``."""
