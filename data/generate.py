"""Generate the shipped instruction dataset, deterministically.

    python data/generate.py            # writes edge_client/datasets/instructions.jsonl

Four task families with checkable answers and no repeated instruction: arithmetic word problems, formatting,
sentiment classification with fixed label words, and number extraction. Each record is
{"instruction", "response", "family"}. The same script always writes the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edge_client" / "datasets" / "instructions.jsonl"
# Records per family; classification has only 12 x 16 = 192 distinct reviews.
PER_FAMILY = {"arithmetic": 700, "formatting": 600, "classification": 192, "extraction": 700}

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards"]
SUBJECTS = ["The film", "This phone", "The hotel room", "The service", "This book", "The cafe", "The charger",
            "The concert", "This jacket", "The delivery", "The museum tour", "This laptop"]
POSITIVE = ["was wonderful", "worked perfectly", "was a real pleasure", "exceeded my expectations",
            "was excellent value", "made my day", "was better than I hoped", "was simply great"]
NEGATIVE = ["was a total waste of money", "broke after a day", "was boring and far too long",
            "was cold and disappointing", "arrived damaged", "was the worst I have had", "never worked properly",
            "left me angry"]
WORDS = ["river", "garden", "window", "planet", "silver", "orange", "winter", "castle", "pencil", "rocket"]


def arithmetic(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
        answer = a + b
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        answer = a - b
    return {"instruction": question + " Answer with a number.", "response": str(answer), "family": "arithmetic"}


def formatting(rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, 3)
    kind = rng.choice(["upper", "reverse", "comma"])
    if kind == "upper":
        return {"instruction": f"Write these words in capital letters: {' '.join(words)}",
                "response": " ".join(words).upper(), "family": "formatting"}
    if kind == "reverse":
        return {"instruction": f"Write these words in reverse order: {' '.join(words)}",
                "response": " ".join(reversed(words)), "family": "formatting"}
    return {"instruction": f"Join these words with commas: {' '.join(words)}",
            "response": ", ".join(words), "family": "formatting"}


def classification(rng: random.Random) -> dict[str, str]:
    positive = rng.random() < 0.5
    text = f"{rng.choice(SUBJECTS)} {rng.choice(POSITIVE if positive else NEGATIVE)}"
    return {"instruction": f"Is the sentiment of this review positive or negative? Review: \"{text}.\"",
            "response": "positive" if positive else "negative", "family": "classification"}


def extraction(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    year = rng.randint(1950, 2024)
    count = rng.randint(2, 99)
    sentence = f"In {year}, {name} collected {count} {item} at the market."
    if rng.random() < 0.5:
        return {"instruction": f"What year is mentioned in this sentence? {sentence}", "response": str(year),
                "family": "extraction"}
    return {"instruction": f"How many {item} did {name} collect? {sentence}", "response": str(count),
            "family": "extraction"}


def main() -> None:
    rng = random.Random(20261123)
    records = []
    seen: set[str] = set()  # unique instructions: a held-out record must not also be a training record
    for make in (arithmetic, formatting, classification, extraction):
        made = 0
        while made < PER_FAMILY[make.__name__]:
            record = make(rng)
            if record["instruction"] not in seen:
                seen.add(record["instruction"])
                records.append(record)
                made += 1
    rng.shuffle(records)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8", newline="\n") as out:
        for record in records:
            out.write(json.dumps(record, sort_keys=True) + "\n")
    print(f"wrote {len(records)} records to {OUT}")


if __name__ == "__main__":
    main()
