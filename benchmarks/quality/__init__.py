"""``roma_bench``: quality benchmarks of router patches (``roma-bench``).

The generic modules (``protocol``, ``runs``, ``stats``, ``results``, ``report``, ``oracle``,
``embedders``) hold what any quality benchmark of the trainer needs; ``synthetic`` is the
routing-gap benchmark on synthetic tasks and the tiny OLMoE pretrained on them. The benchmark
uses the trainer as any user would, through roma_trainer's public functions.
"""
