"""The offline default task: make a small GPT-2 polite.

Everything here is generated deterministically from a seed, so the tiny pipeline needs no
download: a corpus of requests and replies of varied politeness, the tokenizers trained on
it, and `politeness_score`, the documented ground truth that the reward model learns by
regression and that evaluation uses as an independent judge.

The ground truth: each polite phrase in `POLITE` adds its weight and each rude phrase in
`RUDE` subtracts its weight, every distinct phrase counted once however often it repeats
(so spamming "please" earns nothing more); the score is tanh of the total, in (-1, 1).
Phrases match case-insensitively on word boundaries.
"""

import dataclasses
import json
import math
import random
import re
from pathlib import Path

from jaxrlhf.parallel import on_main

POLITE = {
    "please": 0.5, "thank you": 0.6, "thanks": 0.5, "happy to": 0.5, "of course": 0.4, "glad": 0.4,
    "certainly": 0.4, "sorry": 0.3, "wonderful": 0.3, "pleasure": 0.4, "no problem": 0.3,
    "let me know": 0.3, "appreciate": 0.5, "kind": 0.3, "absolutely": 0.3,
}
RUDE = {
    "ugh": 0.5, "whatever": 0.5, "stop bothering me": 0.8, "figure it out yourself": 0.8,
    "leave me alone": 0.8, "waste of my time": 0.8, "don't ask": 0.6, "seriously": 0.3, "not again": 0.4,
    "annoying": 0.5, "stupid": 0.8, "go away": 0.7, "no way": 0.4,
}
_PATTERNS = {p: re.compile(rf"(?<!\w){re.escape(p)}(?!\w)") for p in (*POLITE, *RUDE)}


def politeness_score(text: str) -> float:
    """The ground-truth politeness of a reply, in (-1, 1); see the module docstring."""
    text = text.lower()
    total = sum(w for p, w in POLITE.items() if _PATTERNS[p].search(text))
    total -= sum(w for p, w in RUDE.items() if _PATTERNS[p].search(text))
    return math.tanh(total)


TASKS = [
    "help me move the couch", "send me the report", "fix my bike", "explain this bill", "lend me your charger",
    "water the plants", "check my essay", "book a table for two", "pick up the kids", "call the plumber",
    "walk the dog", "clean the kitchen", "print these pages", "find my keys", "update the website",
    "bake a cake for the party", "review my code", "carry these boxes", "drive me to the airport",
    "answer the phone", "feed the cat", "order more coffee", "reset my password", "paint the fence",
    "translate this letter", "cook dinner tonight", "wash the car", "plan the meeting", "sort the mail",
    "tune the piano", "mow the lawn", "share your notes", "close the window", "buy some bread",
]
_ASKS = ["Can you {}?", "Could you {}?", "I need you to {}.", "Would you {}?", "Please {}.", "{} now."]
_OPENERS = {
    "polite": ["Of course!", "Certainly.", "I would be happy to help.", "Absolutely, with pleasure.",
               "Sure, no problem.", "Thanks for asking!", "Glad to help."],
    "neutral": ["Okay.", "Fine.", "Alright.", "Yes.", "I can do that.", "Sure.", "Noted."],
    "rude": ["Ugh.", "Whatever.", "Seriously?", "Not again.", "No way.", "Ugh, fine."],
}
_MIDDLES = ["I will {} {}.", "I can {} {}.", "I'll {} {}.", "Maybe I will {} {}."]
_WHEN = ["today", "tomorrow", "later", "this afternoon", "in an hour", "soon", "after lunch", "next week"]
_CLOSERS = {
    "polite": ["Thank you for your patience.", "Let me know if you need anything else.", "Have a wonderful day!",
               "I appreciate you asking.", "Sorry for the wait.", "Thanks so much."],
    "neutral": ["", "That is all.", "See you.", "Bye.", "It is on the list."],
    "rude": ["Stop bothering me.", "Figure it out yourself.", "Don't ask again.", "Leave me alone.",
             "This is a waste of my time.", "You are so annoying.", "Go away."],
}
PROMPT_TEMPLATE = "Request: {request}\nReply:"


def _reply(rng: random.Random, task: str, tone: str) -> str:
    # Mostly one tone per reply, sometimes mixed, so each phrase's effect can be learned apart.
    opener_tone = tone if rng.random() < 0.8 else rng.choice(list(_OPENERS))
    closer_tone = tone if rng.random() < 0.8 else rng.choice(list(_CLOSERS))
    middle = rng.choice(_MIDDLES).format(task, rng.choice(_WHEN))
    parts = [rng.choice(_OPENERS[opener_tone]), middle, rng.choice(_CLOSERS[closer_tone])]
    return " ".join(p for p in parts if p)


def make_corpus(n: int, seed: int, tones=(("polite", 0.3), ("neutral", 0.4), ("rude", 0.3)),
                fragments: float = 0.0) -> list[dict]:
    """`n` rows of {"prompt", "response", "score"}; prompts end in "Reply:" and responses start
    with a space, so prompt + response is the text the policy sees. A `fragments` share of
    the replies is cut to a random prefix of words: reward-model data, so that the model
    also scores the truncated, odd replies a policy produces while it learns."""
    rng = random.Random(seed)
    names, weights = zip(*tones)
    rows = []
    for _ in range(n):
        task = rng.choice(TASKS)
        request = rng.choice(_ASKS).format(task)
        request = request[0].upper() + request[1:]
        response = " " + _reply(rng, task, rng.choices(names, weights)[0])
        if rng.random() < fragments:
            words = response.split()
            response = " " + " ".join(words[: rng.randint(1, len(words))])
        rows.append({"prompt": PROMPT_TEMPLATE.format(request=request), "response": response,
                     "score": politeness_score(response)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def train_tokenizers(texts: list[str], out_dir: Path, gpt2_vocab: int = 1024, bert_vocab: int = 1024):
    """A GPT-2-style byte-level BPE tokenizer (policy) and a BERT WordPiece one (reward model),
    trained on `texts` and saved in HF layout under out_dir/gpt2 and out_dir/bert."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=gpt2_vocab, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    gpt2 = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    gpt2.save_pretrained(str(out_dir / "gpt2"))

    # The WordPiece vocabulary is built here rather than by the tokenizers trainer, whose
    # tie-breaking differs from process to process: the most frequent whole words, then every
    # character alone and as a "##" continuation, so any text still tokenises.
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for w in counts for c in w})
    pieces = specials + chars + [f"##{c}" for c in chars]
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in pieces]
    vocab = {token: i for i, token in enumerate((pieces + words)[:bert_vocab])}
    wp = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wp.normalizer = normalizer
    wp.pre_tokenizer = splitter
    wp.decoder = decoders.WordPiece()
    cls_id, sep_id = wp.token_to_id("[CLS]"), wp.token_to_id("[SEP]")
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    bert = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    bert.save_pretrained(str(out_dir / "bert"))
    return gpt2, bert


def score_responses(prompts: list[str], responses: list[str]) -> list[float]:
    """The ground truth as a reward function: `function: jaxrlhf.tasks.politeness:score_responses`."""
    del prompts
    return [politeness_score(r) for r in responses]


@dataclasses.dataclass(frozen=True)
class PolitenessDataConfig:
    output_dir: str = "runs/tiny/data"
    seed: int = 0
    sft_rows: int = 3000
    reward_rows: int = 3000
    prompt_rows: int = 512
    eval_rows: int = 128


def plan(config: PolitenessDataConfig) -> str:
    return (f"politeness data: {config.sft_rows} SFT pairs, {config.reward_rows} scored replies, "
            f"{config.prompt_rows} + {config.eval_rows} prompts, tokenizers -> {config.output_dir}")


def preflight(config: PolitenessDataConfig, resume: bool = False) -> None:
    """Nothing to check before writing: the data is generated from the config alone."""
    del config, resume


def run(config: PolitenessDataConfig, resume: bool = False) -> Path:
    """Write sft.jsonl, reward.jsonl, prompts.jsonl, eval_prompts.jsonl and the tokenizers."""
    del resume  # cheap and deterministic: always rebuilt whole
    out = Path(config.output_dir)
    sft = make_corpus(config.sft_rows, config.seed)
    reward = make_corpus(config.reward_rows, config.seed + 1, fragments=0.4)
    prompts = make_corpus(config.prompt_rows, config.seed + 2)
    held_out = make_corpus(config.eval_rows, config.seed + 3)

    def write():
        write_jsonl(sft, out / "sft.jsonl")
        write_jsonl([{"text": r["response"], "label": r["score"]} for r in reward], out / "reward.jsonl")
        write_jsonl([{"prompt": r["prompt"]} for r in prompts], out / "prompts.jsonl")
        write_jsonl([{"prompt": r["prompt"]} for r in held_out], out / "eval_prompts.jsonl")
        train_tokenizers([r["prompt"] + r["response"] for r in sft + reward], out / "tokenizers")
        scores = [r["score"] for r in sft]
        print(f"wrote the politeness data to {out} (SFT replies: mean ground-truth score "
              f"{sum(scores) / len(scores):+.3f})")

    # In a multi-process run, process 0 writes and the others wait: the next stage reads the files.
    on_main(write, out)
    return out
