"""The RoMA router service: ``gateway/`` (the public door), ``registry/`` (Redis, the source of
truth) and ``engine/`` (the only code touching vLLM). Data flows one way: a patch file arrives at
POST /routers, is validated and stored in the registry, then applied to every engine. See
docs/service.md."""
