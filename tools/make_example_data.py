#!/usr/bin/env python3
"""Writes the bundled example dataset: short product reviews labelled positive or negative.

    python3 tools/make_example_data.py      # writes examples/sentiment/{train,eval}.jsonl

The task is chosen so that fine-tuning has a clear, measurable effect in a few minutes on a CPU:
an instruction-tuned model answers "Is this review positive or negative?" with a sentence of its
own, so exact-match accuracy on the one-word label starts near zero and rises once the adapter
has learnt both the format and the judgement. Reviews are composed from phrase lists written for
this project; a fixed seed makes the files reproducible, and the eval split uses products and
phrasings the training split never saw together.
"""
import json
import os
import random

PRODUCTS = ["blender", "backpack", "desk lamp", "phone case", "coffee grinder", "rain jacket", "keyboard",
            "water bottle", "air fryer", "pair of headphones", "office chair", "tent", "electric kettle",
            "yoga mat", "wireless mouse", "frying pan", "alarm clock", "suitcase", "bike helmet", "toaster",
            "monitor stand", "hiking boots", "vacuum cleaner", "travel mug", "bookshelf", "space heater",
            "garden hose", "sewing machine", "baby monitor", "smart watch"]
POSITIVE = ["works perfectly", "exceeded my expectations", "is worth every penny", "feels very well made",
            "arrived early and works great", "is the best purchase I made this year", "does exactly what it promises",
            "is sturdy and easy to use", "made my mornings so much easier", "still works flawlessly after months",
            "looks even better than the photos", "is quiet, fast and reliable"]
NEGATIVE = ["stopped working after a week", "is a complete waste of money", "feels cheap and flimsy",
            "arrived broken and support never replied", "is the worst purchase I made this year",
            "does not do what it promises", "is loud and hard to use", "made my mornings more stressful",
            "fell apart within a month", "looks nothing like the photos", "overheats and smells of plastic",
            "broke the second time I used it"]
POS_EXTRA = ["I would buy it again.", "Highly recommended.", "Five stars from me.", "My whole family loves it.",
             "I have already ordered a second one.", "No complaints at all."]
NEG_EXTRA = ["I want a refund.", "Do not buy this.", "One star, and that is generous.", "I am returning it.",
             "Avoid this brand.", "Very disappointed."]
OPENERS = ["This {p}", "The {p} I ordered", "My new {p}", "Honestly, this {p}", "After two weeks, the {p}"]
TURNS_POS = ["I was skeptical at first, but this {p} {x}.", "I almost returned this {p}, but it {x}."]
TURNS_NEG = ["I wanted to love this {p}, but it {x}.", "The box looked great, but the {p} {x}."]
QUESTION = "Is this review positive or negative? Answer with one word."


def review(rng, product, positive):
    phrase = rng.choice(POSITIVE if positive else NEGATIVE)
    extra = rng.choice(POS_EXTRA if positive else NEG_EXTRA)
    if rng.random() < 0.3:
        body = rng.choice(TURNS_POS if positive else TURNS_NEG).format(p=product, x=phrase)
    else:
        body = rng.choice(OPENERS).format(p=product) + " " + phrase + "."
    return f"{body} {extra}"


def make(rng, products, n):
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        text = review(rng, rng.choice(products), positive)
        rows.append({"prompt": f"Review: {text}\n{QUESTION}", "completion": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows


def main():
    rng = random.Random(20261129)
    products = PRODUCTS[:]
    rng.shuffle(products)
    train_products, eval_products = products[:24], products[24:]
    out = os.path.join(os.path.dirname(__file__), "..", "examples", "sentiment")
    os.makedirs(out, exist_ok=True)
    for name, prods, n in [("train", train_products, 320), ("eval", eval_products, 40)]:
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for row in make(rng, prods, n):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
