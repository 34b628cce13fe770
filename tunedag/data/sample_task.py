"""The synthetic task shipped with tunedag: name the one animal in a list of words.

It has one right answer per prompt, so the evaluation can show that a fine-tuned model beats
its base by exact match, not only by loss; and it is small enough that LoRA on the built-in
random-init model learns it on a CPU in minutes (the answer depends on which words occur, not
on their order, so no attention pattern has to be discovered from scratch).
"""
from __future__ import annotations

import random

ANIMALS = "cat dog fox owl bear wolf horse mouse".split()
OTHER_WORDS = (
    "apple banana cherry grape lemon mango peach plum "
    "red green blue yellow black white orange purple "
    "sun moon star rain snow wind cloud river"
).split()
WORDS = ANIMALS + OTHER_WORDS
INSTRUCTION = "Which word in the list is an animal?"


def animal_rows(n_rows: int, seed: int = 0, min_words: int = 3, max_words: int = 6) -> list[dict]:
    """``n_rows`` alpaca rows (instruction/input/output): one animal hidden among other words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        words = rng.sample(OTHER_WORDS, rng.randint(min_words, max_words) - 1)
        animal = rng.choice(ANIMALS)
        words.insert(rng.randrange(len(words) + 1), animal)
        rows.append({"instruction": INSTRUCTION, "input": " ".join(words), "output": animal})
    return rows
