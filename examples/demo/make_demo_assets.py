"""Regenerate the bundled demo assets: a tiny byte-level BPE tokenizer and toy preference/SFT data.

The task is small enough for a 2-layer model to learn on a CPU in a minute or two, and real enough
to show learning: each prompt asks for the colour of an object; the chosen answer names its colour,
the rejected answer names a wrong one. Validation pairs use the same objects with other phrasings
and other wrong colours, so validation accuracy rises only if the model learns object -> colour.
The same pairs are written as DPO rows (dpo_*), SFT conversations (sft_*) and NeMo-Aligner reward-model
comparison files (rm_comparisons_*: a chosen line, then its rejected line); PPO prompts (ppo_prompts_*) are
the comparisons' questions as the reward model reads them.
Deterministic: running it again rewrites identical files.

    python examples/demo/make_demo_assets.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "nemo_aligner" / "demo"  # shipped in the wheel
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black", "brown", "pink"]
OBJECTS = {
    "banana": "yellow", "lemon": "yellow", "sun": "yellow", "corn": "yellow",
    "grass": "green", "leaf": "green", "frog": "green", "lime": "green",
    "sky": "blue", "ocean": "blue", "sapphire": "blue", "blueberry": "blue",
    "tomato": "red", "strawberry": "red", "cherry": "red", "ruby": "red",
    "carrot": "orange", "pumpkin": "orange", "tangerine": "orange", "apricot": "orange",
    "plum": "purple", "grape": "purple", "lavender": "purple", "eggplant": "purple",
    "snow": "white", "milk": "white", "cloud": "white", "salt": "white",
    "coal": "black", "crow": "black", "night": "black", "ink": "black",
    "chocolate": "brown", "bear": "brown", "coffee": "brown", "acorn": "brown",
    "flamingo": "pink", "piglet": "pink", "bubblegum": "pink", "rose quartz": "pink",
}
TRAIN_PROMPTS = ["What color is the {o}?", "Tell me the color of the {o}.", "Which color does the {o} have?",
                 "Name the color of the {o}."]
VAL_PROMPTS = TRAIN_PROMPTS + ["What is the color of the {o}?"]
ANSWERS = ["The {o} is {c}.", "I think the {o} is {c}.", "Every {o} is {c}."]
SYSTEM = "You answer questions about colors."


def pair(rng, obj, prompt_templates):
    right = OBJECTS[obj]
    wrong = rng.choice([c for c in COLOURS if c != right])
    answer = rng.choice(ANSWERS)
    return {
        "prompt": [{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": rng.choice(prompt_templates).format(o=obj)}],
        "chosen_response": {"role": "assistant", "content": answer.format(o=obj, c=right).capitalize()},
        "rejected_response": {"role": "assistant", "content": answer.format(o=obj, c=wrong).capitalize()},
    }


def comparisons(rows):
    """NeMo-Aligner's reward-model comparison format: {"text": prompt + chosen}, then {"text": prompt + rejected}."""
    out = []
    for r in rows:
        question = r["prompt"][-1]["content"]
        out += [{"text": f"Q: {question}\nA: {r[key]['content']}"} for key in ("chosen_response", "rejected_response")]
    return out


def ppo_prompts(rows):
    """PPO's prompt rows: each comparison's question, once, as the reward model reads it ("Q: ...\nA:")."""
    questions = dict.fromkeys(r["prompt"][-1]["content"] for r in rows)
    return [{"prompt": f"Q: {q}\nA:"} for q in questions]


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_tokenizer(corpus: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    chatml = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "chat_template": chatml,
              "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main():
    rng = random.Random(1234)
    objects = sorted(OBJECTS)
    train = [pair(rng, obj, TRAIN_PROMPTS) for _ in range(16) for obj in objects]
    rng.shuffle(train)
    val = [pair(rng, obj, VAL_PROMPTS) for _ in range(2) for obj in objects]
    rng.shuffle(val)
    write_jsonl(HERE / "data" / "dpo_train.jsonl", train)
    write_jsonl(HERE / "data" / "dpo_val.jsonl", val)
    sft = lambda rows: [{"messages": r["prompt"] + [r["chosen_response"]]} for r in rows]  # noqa: E731
    write_jsonl(HERE / "data" / "sft_train.jsonl", sft(train))
    write_jsonl(HERE / "data" / "sft_val.jsonl", sft(val))
    write_jsonl(HERE / "data" / "rm_comparisons_train.jsonl", comparisons(train))
    write_jsonl(HERE / "data" / "rm_comparisons_val.jsonl", comparisons(val))
    write_jsonl(HERE / "data" / "ppo_prompts_train.jsonl", ppo_prompts(train))
    write_jsonl(HERE / "data" / "ppo_prompts_val.jsonl", ppo_prompts(val))
    corpus = [SYSTEM] + [t.format(o=o) for t in TRAIN_PROMPTS + VAL_PROMPTS for o in objects]
    corpus += [a.format(o=o, c=c).capitalize() for a in ANSWERS for o in objects for c in COLOURS]
    corpus += ["system", "user", "assistant", "\n"]
    build_tokenizer(corpus, HERE / "tokenizer")
    print(f"wrote {len(train)} train and {len(val)} validation pairs, tokenizer in {HERE / 'tokenizer'}")


if __name__ == "__main__":
    main()
