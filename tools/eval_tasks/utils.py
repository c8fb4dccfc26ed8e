"""
Helpers the toy task files call (`!function utils.<name>`): load the local problems, build the
prompt, and score a response with task.py's own scorer.

The task files and their .jsonl problems are written by `python eval_harness.py --write-toy-tasks`;
this file is hand-written. Everything is read from disk next to this file, so the toy tasks run
offline from any working directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root, for tools.task

from tools import task  # noqa: E402


def load_jsonl(data_file: str, **_metadata):
    """The problems as a datasets.DatasetDict with one 'test' split.

    lm-eval calls this with the task's dataset_kwargs and its metadata (model_args included),
    hence the catch-all. No Hub access, no datasets cache: the rows are read here.
    """
    import datasets

    with open(os.path.join(HERE, data_file)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    """The prompt exactly as task.py writes it (its trailing newline included)."""
    return doc["prompt"]


@functools.lru_cache(maxsize=1)
def families() -> dict:
    """The task families the files were written from (toy_spec.json: the checkpoint's task spec)."""
    with open(os.path.join(HERE, "toy_spec.json")) as f:
        return task.families_for(json.load(f))


def is_correct(doc: dict, response: str) -> bool:
    """task.py's scorer for the problem's family, as bench.py applies it to a response cut at EOS."""
    problem = task.Problem(**{f.name: doc[f.name] for f in dataclasses.fields(task.Problem)})
    return task.score(problem, response, families())


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(is_correct(doc, results[0]))}
