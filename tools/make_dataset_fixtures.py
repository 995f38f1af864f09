"""Reference tokenization of TRL preference data sets, from TRL's own code.

For each data set in tests/fixtures/datasets/*.jsonl|json (written here), runs
TRL 1.16's DPOTrainer._prepare_dataset with the SmolLM2-135M-Instruct tokenizer
(tests/fixtures/tokenizer/smollm2, built from the GGUF by transformers) and its
chat template, and records per row prompt_ids / chosen_ids / rejected_ids, the
rows dropped at max_length, and TRL's collated, truncated sequences with their
completion masks for keep_start and keep_end. Writes <name>.expected.json next
to each data set. Run by tools/make-fixtures."""
import json
import os
import sys

import trl
import transformers
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "datasets")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "smollm2")
# short enough that some rows are dropped and some truncated (SmolLM2's default system
# prompt alone is ~20 tokens, so conversations get a longer limit)
MAX_LENGTH = {"standard": 24, "conversational": 48}

SYS = {"role": "system", "content": "You are a terse assistant."}


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


DATASETS = {
    "standard_explicit": [
        {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon, I think."},
        {"prompt": "Name a prime number:", "chosen": " 7", "rejected": " 8<|im_end|>"},
        {"prompt": "Translate 'cat' to German.", "chosen": "Katze", "rejected": "Hund"},
        {"prompt": "Emoji? ", "chosen": "🙂 yes", "rejected": "no 👎🏽"},
        {"prompt": "Déjà vu means", "chosen": " already seen.", "rejected": " a type of wine."},
        {"prompt": "Write a long answer about the sea and the sky and the wind please now",
         "chosen": " The sea is wide and the sky is high and the wind blows over both all day long.",
         "rejected": " No."},
        {"prompt": "Count with me: " + " ".join(["one", "two", "three", "four", "five", "six"] * 5),
         "chosen": " fourteen", "rejected": " twenty"},
        {"prompt": "Code:", "chosen": "\n```py\nprint(1)\n```", "rejected": "\nprint 1"},
    ],
    "standard_implicit": [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Answer: yes", "rejected": "Answer: no"},
        {"chosen": "abc", "rejected": "abcd"},
        {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
        {"chosen": "Zebra ", "rejected": "apple"},
        {"chosen": "Größe: groß", "rejected": "Größe: klein"},
    ],
    "conversational_explicit": [
        {"prompt": [u("What color is the sky?")], "chosen": [a("It is blue.")], "rejected": [a("It is green.")]},
        {"prompt": [SYS, u("Hi!")], "chosen": [a("Hello.")], "rejected": [a("Hey there, how can I help you today?")]},
        {"prompt": [u("2+2?"), a("4"), u("And 3+3?")], "chosen": [a("6")], "rejected": [a("7")]},
        {"prompt": [u("Say something long " * 6)], "chosen": [a("Okay.")], "rejected": [a("No.")]},
        {"prompt": [u("Unicode: ünïcødé ✓")], "chosen": [a("  spaced  ")], "rejected": [a("tight")]},
    ],
    "conversational_implicit": [
        {"chosen": [u("What is your name?"), a("I am Deep SmolLM.")],
         "rejected": [u("What is your name?"), a("I am SmolLM.")]},
        {"chosen": [SYS, u("Capital of Italy?"), a("Rome.")], "rejected": [SYS, u("Capital of Italy?"), a("Milan.")]},
        {"chosen": [u("a"), a("b"), u("c"), a("d")], "rejected": [u("a"), a("b"), u("c"), a("e")]},
        # (conversations that differ from the first message leave an empty prompt, which
        # transformers refuses to render: TRL fails there; dpoc reports a bad record)
    ],
}


class _Stub:
    """What DPOTrainer._prepare_dataset reads from `self`."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer


def prepare(rows, tokenizer, max_length):
    args = DPOConfig(output_dir="/tmp/dpoc-dataset-fixture", max_length=max_length, report_to=[], use_cpu=True,
                     bf16=False, dataset_num_proc=None)
    ds = Dataset.from_list(rows)
    out = DPOTrainer._prepare_dataset(_Stub(tokenizer), ds, tokenizer, args, "train")
    return [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
            for r in out]


def collate(prepared, tokenizer, max_length, mode):
    coll = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=mode)
    b = coll(prepared)
    n = len(prepared)
    seqs = []
    for i in range(2 * n):
        am = b["attention_mask"][i].tolist()
        length = sum(am)
        seqs.append({"input_ids": b["input_ids"][i][:length].tolist(),
                     "completion_mask": b["completion_mask"][i][:length].tolist()})
    return {"chosen": seqs[:n], "rejected": seqs[n:]}


def main():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    os.makedirs(OUT, exist_ok=True)
    for name, rows in DATASETS.items():
        with open(os.path.join(OUT, name + ".jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        max_length = MAX_LENGTH[name.split("_")[0]]
        full = prepare(rows, tok, None)
        kept = prepare(rows, tok, max_length)
        # which rows survive the max_length filter: match by content in order
        kept_idx, j = [], 0
        for i, r in enumerate(full):
            if j < len(kept) and kept[j] == r:
                kept_idx.append(i)
                j += 1
        assert j == len(kept)
        if "explicit" in name:
            assert 0 < len(kept) < len(full), name  # the filter must be exercised
        exp = {"tokenizer": "tests/fixtures/tokenizer/smollm2", "max_length": max_length, "rows": full,
               "kept_at_max_length": kept_idx,
               "collated_keep_start": collate(kept, tok, max_length, "keep_start"),
               "collated_keep_end": collate(full, tok, max_length, "keep_end")}
        with open(os.path.join(OUT, name + ".expected.json"), "w") as f:
            json.dump(exp, f)
    # the same explicit rows as a JSON array file
    with open(os.path.join(OUT, "standard_explicit_array.json"), "w", encoding="utf-8") as f:
        json.dump(DATASETS["standard_explicit"], f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "MANIFEST.json"), "w") as f:
        json.dump({"generator": "tools/make_dataset_fixtures.py",
                   "versions": {"trl": trl.__version__, "transformers": transformers.__version__}}, f, indent=1)
    print("dataset fixtures written to", OUT, file=sys.stderr)


if __name__ == "__main__":
    main()
