"""
Helpers the toy task files call (`!function utils.<name>`): load the local problems, build the
prompt, draw its few-shot examples and score a response, each with task.py's own functions.

The task files and their .jsonl problems are written by `python -m tools.eval_harness
--write-toy-tasks`; this file is hand-written. Everything is read from disk next to this file, so
the toy tasks run offline from any working directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import sys

from lm_eval.api.samplers import ContextSampler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository, for tools.task
if ROOT not in sys.path:  # lm-eval runs this file once per `!function`: add the path once
    sys.path.insert(0, ROOT)

from tools import task  # noqa: E402

SHOT_SEED = 0  # task.few_shot's default seed, so the shots are the project's own; lm-eval's
#   few-shot seed (--seed's fourth value) does not change them


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


def as_problem(doc: dict) -> task.Problem:
    """The task.py problem a row was written from (the multiple-choice rows carry more fields)."""
    return task.Problem(**{f.name: doc[f.name] for f in dataclasses.fields(task.Problem)})


def is_correct(doc: dict, response: str) -> bool:
    """task.py's scorer for the problem's family, as bench.py applies it to a response cut at EOS."""
    return task.score(as_problem(doc), response, families())


class TaskShots(ContextSampler):
    """lm-eval's few-shot sampler for the toy tasks: the shots of task.few_shot(problem, n).

    lm-eval writes each returned row as doc_to_text + target_delimiter ("") + doc_to_target +
    fewshot_delimiter (task.SHOT_SEPARATOR), then the question: task.with_shots's format. The
    rows are drawn as task.few_shot draws them, from the family's training stream, never from
    the pool lm-eval offers (the test split); the prompt they make is checked against it.
    """

    def sample(self, n: int, eval_doc: dict | None = None, df=None, **kwargs) -> list[dict]:
        if not 0 <= n <= task.MAX_SHOTS:
            raise ValueError(f"--num_fewshot {n}: the toy tasks take 0..{task.MAX_SHOTS} shots (task.MAX_SHOTS)")
        if eval_doc is None:
            raise ValueError("the toy tasks' shots depend on the question: their task files need "
                             "fewshot_split equal to test_split (rebuild them with --write-toy-tasks)")
        problem, fams = as_problem(eval_doc), families()
        family = fams[problem.family]
        # task.few_shot's own draw: the same seed string, the same excluded prompts.
        rng = random.Random(f"shots/{SHOT_SEED}/{problem.family}/{problem.prompt}")
        shots = task.draw_shots(family, rng, n, family.held_out_prompts() | {problem.prompt})
        if task.with_shots(problem, shots) != task.few_shot(problem, n, SHOT_SEED, fams):
            raise RuntimeError("task.few_shot no longer draws its shots as eval_tasks/utils.py does; update TaskShots")
        return [dataclasses.asdict(s) for s in shots]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(is_correct(doc, results[0]))}
