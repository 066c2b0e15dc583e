"""``/routers``: deploy, list, inspect, activate and delete router versions (admin token)."""
