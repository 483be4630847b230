"""Write the demo task that ships with the project: route customer-support messages to a team.

Deterministic (seeded) templates; run once to regenerate scripts/tasks/demo/{train,dev}.jsonl.
Train and dev use disjoint subjects, so the dev score measures generalisation, not recall.
"""

import json
import random
from pathlib import Path

OPENERS = ["Hi,", "Hello team,", "Hey,", "Good morning,", "", "Urgent:", "Quick question:"]
CLOSERS = ["", "Thanks.", "Please help.", "Can you look into it?", "Any update?", "Regards."]
TEMPLATES = {
    "billing": [
        "I was charged twice for my {x} this month.", "The invoice for my {x} shows the wrong amount.",
        "Please refund the payment for my {x}.", "My card was declined when paying for the {x}.",
        "Why did the price of my {x} subscription go up?", "I need a receipt for the {x} I bought.",
    ],
    "shipping": [
        "My {x} has not arrived yet.", "The tracking number for my {x} does not work.",
        "The {x} was delivered to the wrong address.", "Can I change the delivery date of my {x}?",
        "The box with my {x} arrived damaged.", "How long does shipping take for the {x}?",
    ],
    "technical": [
        "My {x} does not turn on anymore.", "The app crashes when I connect my {x}.",
        "How do I reset the {x} to factory settings?", "The {x} keeps losing its wifi connection.",
        "The firmware update failed on my {x}.", "The screen of my {x} flickers.",
    ],
}
TRAIN_ITEMS = ["headphones", "laptop", "phone", "router", "camera", "tablet", "speaker", "printer"]
DEV_ITEMS = ["smartwatch", "monitor", "keyboard", "drone"]


def rows(items, n, rng):
    out = []
    for _ in range(n):
        team = rng.choice(sorted(TEMPLATES))
        body = rng.choice(TEMPLATES[team]).format(x=rng.choice(items))
        text = " ".join(p for p in (rng.choice(OPENERS), body, rng.choice(CLOSERS)) if p)
        out.append({"text": text, "team": team})
    return out


def main():
    rng = random.Random(7)
    here = Path(__file__).parent / "tasks" / "demo"
    here.mkdir(parents=True, exist_ok=True)
    for name, items, n in (("train", TRAIN_ITEMS, 240), ("dev", DEV_ITEMS, 60)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(items, n, rng)))


if __name__ == "__main__":
    main()
