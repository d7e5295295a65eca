"""Prompt formats shared by training, evaluation and the device runtime (no torch here).

A training text is prompt + target; the loss covers the target (and the end token) only.
"""

from __future__ import annotations

CAPTION_PROMPT = "Caption:"


def caption_prompt() -> str:
    return CAPTION_PROMPT


def question_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def context_question_prompt(context: str, question: str) -> str:
    """A question about a text in front of it (LM pretraining only: reading comprehension)."""
    return f"{context.strip()} {question_prompt(question)}"


def target_text(answer: str) -> str:
    """The target follows the prompt after one space (byte-level BPE keeps it in the token)."""
    return " " + answer.strip()


def parse_yes_no(answer: str) -> str:
    """POPE's official parsing (its evaluate.py, word for word): the text before the first
    '.', commas deleted, split on spaces; 'No', 'no' or 'not' among the words -> no, else yes.
    Case counts as there ('NO' and 'Not sure' are yes); only the ends are stripped here."""
    words = answer.strip().split(".")[0].replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"
