"""The quality benchmark on real multiple-choice tasks (OLMES data) and a real MoE model."""
