"""The routing-gap benchmark on synthetic tasks: a tiny OLMoE pretrained here whose experts
specialise by task domain, evaluated on phrasings it has never seen."""
