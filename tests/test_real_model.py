"""Opt-in (NEMO_ALIGNER_REAL_MODEL=/path/to/a/small/chat/model, e.g. SmolLM2-135M-Instruct): the README's DPO
command, only paths and batch sizes changed, on a real chat model and a small factual preference set. It
must lower validation loss, and the exported hf/ must still answer simple factual questions correctly
(checked with transformers' greedy generation). Not in the default suite: it reads a real checkpoint and
takes minutes on a CPU.

    NEMO_ALIGNER_REAL_MODEL=/work/tools/smollm2-135m-instruct python -m pytest -q -s tests/test_real_model.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_metrics

MODEL = os.environ.get("NEMO_ALIGNER_REAL_MODEL")
pytestmark = pytest.mark.skipif(not MODEL, reason="set NEMO_ALIGNER_REAL_MODEL to a small Hugging Face chat model")

# (question, a correct answer, a wrong answer)
CAPITALS = [("France", "Paris", "Lyon"), ("Japan", "Tokyo", "Osaka"), ("Italy", "Rome", "Milan"),
            ("Germany", "Berlin", "Munich"), ("Spain", "Madrid", "Barcelona"), ("Canada", "Ottawa", "Toronto"),
            ("Australia", "Canberra", "Sydney"), ("Egypt", "Cairo", "Alexandria"), ("Russia", "Moscow", "Kazan"),
            ("China", "Beijing", "Shanghai"), ("India", "New Delhi", "Mumbai"), ("Brazil", "Brasilia", "Rio de Janeiro"),
            ("Turkey", "Ankara", "Istanbul"), ("Kenya", "Nairobi", "Mombasa"), ("Greece", "Athens", "Sparta"),
            ("Portugal", "Lisbon", "Porto"), ("Norway", "Oslo", "Bergen"), ("Sweden", "Stockholm", "Malmo"),
            ("Poland", "Warsaw", "Krakow"), ("Ireland", "Dublin", "Cork"), ("Austria", "Vienna", "Salzburg"),
            ("Argentina", "Buenos Aires", "Cordoba"), ("Mexico", "Mexico City", "Guadalajara"),
            ("Peru", "Lima", "Cusco"), ("Thailand", "Bangkok", "Phuket"), ("Vietnam", "Hanoi", "Da Nang"),
            ("South Korea", "Seoul", "Busan"), ("Netherlands", "Amsterdam", "Rotterdam"),
            ("Switzerland", "Bern", "Zurich"), ("Morocco", "Rabat", "Casablanca"), ("Nigeria", "Abuja", "Lagos"),
            ("Pakistan", "Islamabad", "Karachi"), ("New Zealand", "Wellington", "Auckland"),
            ("Belgium", "Brussels", "Antwerp"), ("Denmark", "Copenhagen", "Aarhus"), ("Finland", "Helsinki", "Turku"),
            ("Hungary", "Budapest", "Debrecen"), ("Chile", "Santiago", "Valparaiso"), ("Cuba", "Havana", "Santiago"),
            ("Colombia", "Bogota", "Medellin")]
FACTS = [("How many days are in a week?", "There are seven days in a week.", "There are five days in a week."),
         ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
         ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "The sky is green on a clear day."),
         ("What is the largest planet in our solar system?", "Jupiter is the largest planet.",
          "Mars is the largest planet."),
         ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
          "Charles Dickens wrote Romeo and Juliet."),
         ("What is the chemical formula of water?", "The chemical formula of water is H2O.",
          "The chemical formula of water is CO2."),
         ("At what temperature does water boil at sea level in Celsius?", "Water boils at 100 degrees Celsius.",
          "Water boils at 50 degrees Celsius."),
         ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
         ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.",
          "Water freezes at 20 degrees Celsius."),
         ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.",
          "Venus is known as the Red Planet."),
         ("How many hours are in a day?", "There are 24 hours in a day.", "There are 12 hours in a day."),
         ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide.", "Plants absorb helium."),
         ("How many continents are there?", "There are seven continents.", "There are three continents."),
         ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest.",
          "The Indian Ocean is the largest."),
         ("What is 10 times 10?", "10 times 10 is 100.", "10 times 10 is 1000."),
         ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.",
          "The rabbit is known as the king of the jungle.")]
# (question, a word the right answer contains): what the export must still answer
QUESTIONS = [("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
             ("What is the capital of Italy?", "rome"), ("What is the capital of Germany?", "berlin"),
             ("What is the capital of Spain?", "madrid"), ("What color is the sky on a clear day?", "blue"),
             ("How many days are in a week?", "seven"), ("Which planet is known as the Red Planet?", "mars"),
             ("Who wrote Romeo and Juliet?", "shakespeare"), ("What is the largest planet in our solar system?",
                                                             "jupiter")]


def preference_rows() -> list[dict]:
    pairs = [(f"What is the capital of {country}?", f"The capital of {country} is {right}.",
              f"The capital of {country} is {wrong}.") for country, right, wrong in CAPITALS] + FACTS
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in pairs]


def write_data(folder: Path) -> tuple[Path, Path]:
    """56 factual pairs: 48 to train on, 8 (every seventh) to validate on."""
    rows = preference_rows()
    val = [r for i, r in enumerate(rows) if i % 7 == 3]
    train = [r for i, r in enumerate(rows) if i % 7 != 3]
    folder.mkdir(parents=True, exist_ok=True)
    for name, split in (("train.jsonl", train), ("val.jsonl", val)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in split))
    return folder / "train.jsonl", folder / "val.jsonl"


def greedy_answers(model_dir, questions, max_new_tokens=24) -> list[str]:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for question in questions:
        text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tok.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def readme_command(model, train, val, log_dir, micro=2, global_batch=8) -> list[str]:
    """README.md's DPO command with only the paths and the batch sizes changed."""
    return [sys.executable, str(ROOT / "examples/nlp/gpt/train_gpt_dpo.py"),
            "trainer.num_nodes=1", "trainer.devices=1",
            f"++model.micro_batch_size={micro}", f"++model.global_batch_size={global_batch}",
            f"pretrained_checkpoint.restore_from_path={model}",
            f"model.data.data_prefix={{train: [{train}], validation: [{val}], test: [{val}]}}",
            f"exp_manager.explicit_log_dir={log_dir}",
            "++trainer.dpo.max_epochs=1", "++model.dpo.ref_policy_kl_penalty=0.1"]


def test_readme_dpo_command_on_a_real_chat_model(tmp_path):
    train, val = write_data(tmp_path / "data")
    log_dir = tmp_path / "dpo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(readme_command(MODEL, train, val, log_dir) + ["++exp_manager.progress_bar=false"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bundled demo" not in out.stdout
    rows = read_metrics(log_dir)
    val_losses = [r["val/loss"] for r in rows if "val/loss" in r]
    print(out.stdout[-3000:])
    print("val/loss by validation:", [round(v, 4) for v in val_losses])
    assert val_losses[-1] < 0.6931 - 0.005  # below log 2, where policy == reference starts
    questions = [q for q, _ in QUESTIONS]
    before, after = greedy_answers(MODEL, questions), greedy_answers(log_dir / "hf", questions)
    right_before = [word in a.lower() for (_, word), a in zip(QUESTIONS, before)]
    right_after = [word in a.lower() for (_, word), a in zip(QUESTIONS, after)]
    for (question, _), a, b in zip(QUESTIONS, before, after):
        print(f"{question!r}: before {a!r} | after {b!r}")
    print(f"correct before {sum(right_before)}/{len(QUESTIONS)}, after {sum(right_after)}/{len(QUESTIONS)}")
    # greedy answers of a 135M model flip on borderline questions either way (one of ten did each way on
    # SmolLM2-135M-Instruct, docs/runs.md): the export must answer at least as many as the model it started from
    assert sum(right_after) >= sum(right_before) > 0
