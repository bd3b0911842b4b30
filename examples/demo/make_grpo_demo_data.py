"""Regenerate the GRPO demo's prompts: which colour is a banana? -- asked with no answer given, so the
reward functions must verify it (`answer` column: the colour). Uses the objects and phrasings of the other
demos (make_demo_assets.py) and the bundled demo tokenizer. Validation asks about the same objects with a
phrasing training never uses. Deterministic: running it again rewrites identical files.

    python examples/demo/make_grpo_demo_data.py
"""

import json
from pathlib import Path

from make_demo_assets import COLOURS, OBJECTS, TRAIN_PROMPTS, VAL_PROMPTS

HERE = Path(__file__).parent
COLOUR_PATTERN = r"\b(" + "|".join(COLOURS) + r")\b"  # what the demo's reward functions look for


def rows(templates):
    return [{"prompt": [{"role": "user", "content": t.format(o=obj)}], "answer": colour}
            for t in templates for obj, colour in OBJECTS.items()]


def main():
    out = HERE / "data"
    for name, templates in (("grpo_train.jsonl", TRAIN_PROMPTS), ("grpo_val.jsonl", VAL_PROMPTS[len(TRAIN_PROMPTS):])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows(templates)))
    print(f"wrote {out}/grpo_train.jsonl, grpo_val.jsonl; reward pattern {COLOUR_PATTERN}")


if __name__ == "__main__":
    main()
