"""A synthetic-but-realistic text workload for output-length prediction, and a trace matcher.

Real serving traces (e.g. the Azure LLM inference trace) carry token counts but no text, and the
chat datasets that do (ShareGPT, LMSYS-Chat-1M) cannot be downloaded here. This module generates
prompts whose *output-length distribution depends on what the prompt says*, the way it does for a
chat model:

================  ==============================================  =============================
task              what sets the length                             spread (log-scale σ, ν)
================  ==============================================  =============================
factoid           one fact, "one-word answer"                      small (0.45, 6)
arithmetic        "step by step" multiplies it                     medium (0.5, 5)
translate         proportional to the words of the given sentence  small (0.25, 8)
summarize         "in N words" → ≈1.35·N tokens, else ≈120         small / medium
list              "List K ..." → ≈K·18 tokens                      medium (0.4, 5)
email             formal / short / apology ...                     medium (0.45, 5)
code              language and "with tests / docs"                 wide (0.7, 3.5)
explain           "step by step", topic difficulty                 wide (0.8, 3.5)
essay, story      "short" / "detailed", topic difficulty           wide (0.6-0.7, 3.5)
chat              open-ended chit-chat and requests for help       very wide (1.0, 3)
================  ==============================================  =============================

Modifiers shift the median: brevity cues ("Be concise.", "Answer briefly.") × 0.45, detail cues
("Be thorough.", "in detail") × 2.2; topics come in three difficulty tiers (× 0.8 / 1 / 1.5).
The length is drawn as ``round(exp(μ + σ·T_ν))`` clipped to ``[1, max_new_tokens]``, with ``(μ, σ, ν)``
a function of those *text* features only. Predictors see only the prompt text (the numeric
label is never in the text; "in 50 words" is a real instruction a user types, and its effect on
length is noisy). The marginal length distribution is heavy-tailed (median ≈ 130, p99 ≈ 1000
at the default cap), close to the Azure conversation trace.

:func:`match_to_lengths` assigns prompts to given output lengths (e.g. the trace's) by sampling,
for each length ``L``, a prompt from a pool with probability proportional to the prompt's own
length density at ``L``; the prompt–length relation therefore follows the generator's
conditional law, and the lengths stay exactly those of the trace.

Example:
    >>> rows = generate_workload(4, seed=0)
    >>> sorted(rows[0])[:3]
    ['difficulty', 'mu', 'nu']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

COUNTRIES = [
    "France",
    "Japan",
    "Brazil",
    "Kenya",
    "Canada",
    "Norway",
    "Egypt",
    "Peru",
    "India",
    "Chile",
    "Spain",
    "Vietnam",
    "Ghana",
    "Poland",
    "Mexico",
    "Italy",
]
BOOKS = ["War and Peace", "Hamlet", "Dracula", "Moby Dick", "Emma", "Ulysses", "Beloved", "Dune"]
ELEMENTS = ["gold", "iron", "neon", "carbon", "helium", "copper", "sodium", "oxygen"]
LANGS = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
CODE_LANGS = ["Python", "JavaScript", "Rust", "Go", "C++", "Java", "SQL"]
CODE_TASKS = [
    "reverses a string",
    "parses a CSV file and sorts the rows by date",
    "checks if a number is prime",
    "merges two sorted lists",
    "implements a thread-safe LRU cache",
    "computes the edit distance",
    "reads a JSON config and validates it",
    "implements binary search",
    "flattens a nested list",
    "builds a REST client with retries and backoff",
]
THINGS = [
    "fruits",
    "programming languages",
    "European capitals",
    "tips for better sleep",
    "uses of graphene",
    "reasons to learn history",
    "board games",
    "ways to save money",
    "common logical fallacies",
    "machine learning algorithms",
]
TOPICS = {
    "easy": [
        "the color blue",
        "cats",
        "breakfast",
        "the beach",
        "a rainy day",
        "friendship",
        "summer holidays",
        "my favourite fruit",
    ],
    "medium": [
        "the history of Rome",
        "climate change",
        "the printing press",
        "electric cars",
        "the water cycle",
        "social media",
        "the French revolution",
        "photosynthesis",
    ],
    "hard": [
        "quantum field theory",
        "the proof of Fermat's last theorem",
        "general relativity",
        "monetary policy and inflation",
        "protein folding",
        "the P versus NP problem",
        "consciousness and free will",
        "transformer neural networks",
    ],
}
PEOPLE = ["my manager", "a customer", "the landlord", "a professor", "my team", "a recruiter"]
EMAIL_KINDS = {"short": 0.6, "formal": 1.0, "apology": 1.1, "detailed": 1.8}
SENT_WORDS = [
    "the",
    "a",
    "small",
    "old",
    "city",
    "river",
    "quiet",
    "morning",
    "bright",
    "train",
    "market",
    "children",
    "book",
    "friend",
    "green",
    "house",
    "window",
    "garden",
    "story",
    "music",
    "evening",
    "road",
    "cold",
    "warm",
    "people",
    "long",
    "new",
]
CHAT_OPENERS = [
    "Hi! Tell me about {t}.",
    "What do you think about {t}?",
    "Can you help me with {t}?",
    "I have been wondering about {t} lately.",
    "hey, quick thing about {t}",
    "Let's talk about {t}.",
    "Any thoughts on {t}?",
]
BRIEF_CUES = ["Be concise.", "Answer briefly.", "Keep it short.", "One sentence please."]
DETAIL_CUES = [
    "Be thorough.",
    "Explain in detail.",
    "Give a comprehensive answer.",
    "Please be very detailed.",
]
SUMMARY_WORDS = [20, 50, 100, 200, 300]
LIST_COUNTS = [3, 5, 10, 20]
DIFF_MULT = {"easy": 0.8, "medium": 1.0, "hard": 1.5}
TASKS = (
    "factoid",
    "arithmetic",
    "translate",
    "summarize",
    "list",
    "email",
    "code",
    "explain",
    "essay",
    "story",
    "chat",
)
#: sampling weights of the task types (chat-heavy, like a conversation service)
TASK_WEIGHTS = (0.08, 0.07, 0.07, 0.09, 0.08, 0.07, 0.12, 0.1, 0.07, 0.05, 0.2)


def _sentence(rng: np.random.Generator, n: int) -> str:
    words = rng.choice(SENT_WORDS, size=n)
    return " ".join(words).capitalize() + "."


def _cue(rng: np.random.Generator, p_brief: float, p_detail: float) -> tuple[str, float, float]:
    u = rng.random()
    if u < p_brief:
        return " " + str(rng.choice(BRIEF_CUES)), math.log(0.45), 0.8
    if u < p_brief + p_detail:
        return " " + str(rng.choice(DETAIL_CUES)), math.log(2.2), 1.1
    return "", 0.0, 1.0


def _one(rng: np.random.Generator, task: str) -> dict[str, Any]:
    """One prompt of ``task`` with its generative (μ, σ, ν) (natural-log token units)."""
    diff = str(rng.choice(list(TOPICS)))
    topic = str(rng.choice(TOPICS[diff]))
    p_brief, p_detail = 0.15, 0.15
    if task == "factoid":
        kind = rng.integers(3)
        text = [
            f"What is the capital of {rng.choice(COUNTRIES)}?",
            f"Who wrote {rng.choice(BOOKS)}?",
            f"What is the atomic number of {rng.choice(ELEMENTS)}?",
        ][kind]
        if rng.random() < 0.3:
            text, base, sig, nu = "Give a one-word answer. " + text, 3.0, 0.35, 6.0
        else:
            base, sig, nu = 16.0, 0.45, 6.0
        diff = "easy"
    elif task == "arithmetic":
        a, b, c = rng.integers(2, 99, size=3)
        text = [
            f"What is {a} times {b}?",
            f"Solve for x: {a}x + {b} = {c}.",
            f"Is {a * b + 1} a prime number?",
        ][rng.integers(3)]
        base, sig, nu = 30.0, 0.5, 5.0
        if rng.random() < 0.4:
            text += " Show your work step by step."
            base *= 4.0
        diff = "medium"
    elif task == "translate":
        n = int(rng.integers(4, 30))
        text = f"Translate this sentence into {rng.choice(LANGS)}: {_sentence(rng, n)}"
        base, sig, nu = 1.6 * n + 4, 0.25, 8.0
        p_brief = p_detail = 0.0
        diff = "easy"
    elif task == "summarize":
        body = " ".join(_sentence(rng, int(rng.integers(6, 14))) for _ in range(3))
        if rng.random() < 0.6:
            w = int(rng.choice(SUMMARY_WORDS))
            text = f"Summarize the following article in {w} words: {body}"
            base, sig, nu = 1.35 * w, 0.3, 6.0
            p_brief = p_detail = 0.0
        else:
            text = f"Summarize the following article: {body}"
            base, sig, nu = 120.0, 0.6, 4.0
    elif task == "list":
        k = int(rng.choice(LIST_COUNTS))
        text = f"List {k} {rng.choice(THINGS)}."
        base, sig, nu = 18.0 * k, 0.4, 5.0
        if rng.random() < 0.3:
            text += " Explain each one."
            base *= 3.0
        p_brief = p_detail = 0.0
    elif task == "email":
        kind = str(rng.choice(list(EMAIL_KINDS)))
        text = f"Write a {kind} email to {rng.choice(PEOPLE)} about {topic}."
        base, sig, nu = 140.0 * EMAIL_KINDS[kind], 0.45, 5.0
    elif task == "code":
        text = f"Write a {rng.choice(CODE_LANGS)} function that {rng.choice(CODE_TASKS)}."
        base, sig, nu = 170.0, 0.7, 3.5
        if rng.random() < 0.35:
            text += " Include unit tests and docstrings."
            base *= 2.2
    elif task == "explain":
        text = f"Explain {topic}."
        base, sig, nu = 150.0 * DIFF_MULT[diff], 0.8, 3.5
        if rng.random() < 0.4:
            text = f"Explain step by step how {topic} works."
            base *= 1.8
    elif task == "essay":
        size = str(rng.choice(["short", "long", "detailed"]))
        text = f"Write a {size} essay about {topic}."
        base = {"short": 150.0, "long": 320.0, "detailed": 420.0}[size] * DIFF_MULT[diff]
        sig, nu = 0.6, 3.5
    elif task == "story":
        text = f"Write a story about {topic}."
        base, sig, nu = 300.0, 0.7, 3.5
        if rng.random() < 0.3:
            text = f"Write a very short story about {topic}."
            base *= 0.35
    elif task == "chat":
        text = str(rng.choice(CHAT_OPENERS)).format(t=topic)
        base, sig, nu = 100.0 * DIFF_MULT[diff], 1.0, 3.0
    else:  # pragma: no cover - guarded by TASKS
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cue, shift, sig_mult = _cue(rng, p_brief, p_detail)
    return {
        "prompt": text + cue,
        "task": task,
        "difficulty": diff,
        "mu": math.log(base) + shift,
        "sigma": sig * sig_mult,
        "nu": nu,
    }


def _check_seed(seed: Any) -> None:
    """numpy's generator refuses a negative seed with 'expected non-negative integer' and takes None as 'random'."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


def generate_workload(
    n: int, seed: int = 0, max_new_tokens: int = 1000, task_weights: Sequence[float] = TASK_WEIGHTS
) -> list[dict[str, Any]]:
    """``n`` prompts with sampled output lengths.

    Returns a list of dicts with ``prompt`` (text), ``output_len`` (int in ``[1, max_new_tokens]``) and the
    hidden generative parameters ``mu``, ``sigma``, ``nu`` (log-token units), ``task``, ``difficulty``
    (for analysis only; predictors must not read them).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_seed(seed)
    w = np.asarray(task_weights, dtype=np.float64)
    if w.shape != (len(TASKS),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"task_weights must be {len(TASKS)} finite non-negative weights for {TASKS}")
    rng = np.random.default_rng(seed)
    tasks = rng.choice(TASKS, size=n, p=w / w.sum())
    rows = [_one(rng, str(t)) for t in tasks]
    for r in rows:
        y = r["mu"] + r["sigma"] * rng.standard_t(r["nu"])
        r["output_len"] = int(min(max_new_tokens, max(1, round(math.exp(min(y, 50.0))))))
    return rows


def length_pairs(rows: Sequence[dict[str, Any]]) -> dict[str, list]:
    """The ``(prompt, output_len)`` columns of workload rows, as ``LengthPredictor.fit`` / ``evaluate`` take them
    (a plain dict; :func:`to_dataset` gives a ``datasets.Dataset`` with every column)."""
    return {"prompt": [r["prompt"] for r in rows], "output_len": [r["output_len"] for r in rows]}


def to_dataset(rows: Sequence[dict[str, Any]]) -> Any:
    """A ``datasets.Dataset`` with columns ``prompt`` and ``output_len`` (plus the analysis columns)."""
    from datasets import Dataset

    cols = {k: [r[k] for r in rows] for k in rows[0]}
    return Dataset.from_dict(cols)


def load_azure_trace(path: str | None = None, limit: int | None = None) -> dict[str, np.ndarray]:
    """The Azure LLM inference 2023 conversation trace (CC-BY 4.0, Patel et al., Splitwise, ISCA 2024).

    Returns ``arrival`` (seconds from the first request), ``prompt_len`` and ``output_len`` arrays.
    ``path`` defaults to ``$HF_EXT_AZURE_TRACE`` (the CSV), else the copy in ``$HF_EXT_DATA_DIR`` (the folder the
    simulator's :func:`hf_ext.simulate.workload.azure_trace` reads), ``benchmarks/data`` or ``shared/data`` beside
    the checkout.
    """
    import csv
    import datetime as dt
    import os
    from pathlib import Path

    name = "azure_llm_inference_2023_conv.csv"
    if path is None:
        path = os.environ.get("HF_EXT_AZURE_TRACE")
    if path is None:
        root = Path(__file__).resolve().parents[3]
        data_dir = os.environ.get("HF_EXT_DATA_DIR")
        for cand in (
            *([Path(data_dir) / name] if data_dir else []),
            root / "benchmarks" / "data" / name,
            root.parent / "shared" / "data" / name,
        ):
            if cand.exists():
                path = str(cand)
                break
    if path is None or not Path(path).exists():
        raise FileNotFoundError(
            f"{name} not found; pass path=, set HF_EXT_AZURE_TRACE to the CSV or HF_EXT_DATA_DIR to its folder "
            "(download: Azure Public Dataset, AzureLLMInferenceTrace_conv.csv)"
        )
    ts, pl, ol = [], [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                break
            stamp = row["TIMESTAMP"][:26]  # microseconds precision
            ts.append(dt.datetime.fromisoformat(stamp).timestamp())
            pl.append(int(row["ContextTokens"]))
            ol.append(int(row["GeneratedTokens"]))
    t = np.asarray(ts)
    return {"arrival": t - t.min(), "prompt_len": np.asarray(pl), "output_len": np.asarray(ol)}


def match_to_lengths(
    lengths: Sequence[int], pool: Sequence[dict[str, Any]], seed: int = 0, chunk: int = 2048
) -> list[dict[str, Any]]:
    """Assign a prompt from ``pool`` to each target output length.

    For a length ``L``, prompt ``i`` is drawn with probability ∝ ``p_i(L)``, the log-t density of
    prompt ``i``'s generative ``(mu, sigma, nu)`` at ``L`` (a posterior draw of "which prompt produced
    this length"). Returns one dict per length: ``prompt``, the prompt's generative parameters and
    ``output_len = L`` (unchanged).
    """
    from hf_ext.generation.tie.distribution import t_logpdf

    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.ndim != 1 or lengths.size == 0 or np.any(lengths < 1) or not np.all(np.isfinite(lengths)):
        raise ValueError("lengths must be a non-empty 1-D sequence of numbers >= 1")
    if not pool:
        raise ValueError("pool must contain at least one prompt row")
    _check_seed(seed)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (lengths matched per step), got {chunk!r}")
    mu = np.asarray([r["mu"] for r in pool])
    sigma = np.asarray([r["sigma"] for r in pool])
    nu = np.asarray([r["nu"] for r in pool])
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for s in range(0, lengths.size, chunk):
        y = np.log(lengths[s : s + chunk])[:, None]  # (c, 1)
        logp = t_logpdf((y - mu) / sigma, nu) - np.log(sigma)  # (c, P)
        logp -= logp.max(axis=1, keepdims=True)
        p = np.exp(logp)
        cdf = np.cumsum(p, axis=1)
        u = rng.random(len(y))[:, None] * cdf[:, -1:]
        idx = np.minimum((cdf < u).sum(axis=1), len(pool) - 1)
        for j, i in enumerate(idx):
            row = dict(pool[int(i)])
            row["output_len"] = int(lengths[s + j])
            out.append(row)
    return out
