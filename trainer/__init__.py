"""roma-train: RoMA router-only fine-tuning of MoE language models.

Reads a base model and multiple-choice data, tunes only the router linear of the chosen MoE
layers, and writes a router patch (:mod:`roma_patch`). It never serves: the patch goes to the
gateway with ``roma-train train --push`` or ``POST /routers``.

Modules, in data-flow order: ``config`` (typed recipe config; ``flags`` makes the train
command's flags from it), ``data`` (samples + fingerprint), ``routers`` (find, freeze, capture
routing), ``scoring`` (choice log-likelihoods), ``neighbours`` (success-set neighbourhoods in
embedding space), ``objectives`` (loss terms, the registry), ``recipe`` (the training loop),
``evaluate``, ``apply``, ``push``, ``cli``.
"""
