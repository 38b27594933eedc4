"""The reference side of each benchmark: PyTorch transformers and TRL, set up as their users
would (fused AdamW as the transformers Trainer picks it, TRL's own trainers and loops), in
float32 with dropout and gradient checkpointing off, as on the jaxrlhf side.

`setup` returns a zero-argument callable that runs one step to completion.
"""

import queue
import threading
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks import workloads as wl

NO_DROPOUT = {
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(attention_dropout=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=wl.LEARNING_RATE, weight_decay=0.0, fused=True)


def _train_step(model, optimizer, inputs):
    def run():
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def setup(w: wl.Workload, workdir: Path):
    torch.manual_seed(0)
    model_dir = workdir / "model"
    if w.name == "sft":
        model_type = w.model_config()["model_type"]
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **NO_DROPOUT[model_type]).train()
        b = wl.sft_batch(w)
        ids = torch.tensor(b["input_ids"])
        labels = ids.masked_fill(torch.tensor(b["loss_mask"]) == 0, -100)
        return _train_step(model, _adamw(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    if w.name == "generation":
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ids = torch.tensor(wl.prompts(w))

        def run():
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                               temperature=1.0, max_new_tokens=w.response, min_new_tokens=w.response,
                               pad_token_id=w.eos)

        return run
    if w.name == "dpo":
        return _trl_dpo(w, model_dir, workdir)
    if w.name == "ppo":
        return _trl_ppo(w, model_dir, workdir)
    if w.name in ("rloo", "grpo"):
        return _trl_group(w, model_dir, workdir)
    if w.name == "reward":
        model = transformers.BertForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, problem_type="regression", **NO_DROPOUT["bert"]).train()
        b = wl.regression_batch(w)
        ids = torch.tensor(b["input_ids"])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(b["target"])}
        return _train_step(model, _adamw(model), inputs)
    raise ValueError(f"unknown workload {w.name!r}")


# --- TRL: its trainers own the loop, so a callback hands each finished step back ----------

class _StepAtATime(transformers.TrainerCallback):
    """Runs `trainer.train()` in a thread that pauses at the end of every optimizer step;
    each call of the instance lets exactly one more step run and waits for it."""

    def __init__(self, trainer):
        self.trainer, self.go, self.finished = trainer, threading.Semaphore(0), queue.Queue()
        trainer.add_callback(self)
        self.thread = None

    def on_step_end(self, args, state, control, **kwargs):
        self.finished.put(None)
        self.go.acquire()

    def _train(self):
        try:
            self.trainer.train()
            self.finished.put(RuntimeError("the trainer stopped before the benchmark did"))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            self.finished.put(e)

    def __call__(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._train, daemon=True)
            self.thread.start()
        else:
            self.go.release()
        error = self.finished.get()
        if error is not None:
            raise error


def word_tokenizer():
    """A GPT-2-sized tokenizer over the words "w0".."w50255" plus <|endoftext|> (id 50256),
    for TRL, which takes text or a tokenizer; "w5 w7" encodes to [5, 7]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(wl.EOS)} | {"<|endoftext|>": wl.EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def _trl_args(w: wl.Workload, workdir: Path) -> dict:
    return dict(output_dir=str(workdir / f"trl-{w.name}"), learning_rate=wl.LEARNING_RATE, lr_scheduler_type="constant",
                bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                logging_steps=10**6, disable_tqdm=True, use_cpu=True, seed=0)


def _trl_dpo(w: wl.Workload, model_dir: Path, workdir: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = wl.preference_pairs(w)
    rows = [{"prompt": _words(p), "chosen": " " + _words(c[:-1]) + "<|endoftext|>",
             "rejected": " " + _words(r[:-1]) + "<|endoftext|>"}
            for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])]
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    ref = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    args = DPOConfig(**_trl_args(w, workdir), per_device_train_batch_size=w.batch, max_length=w.prompt + w.response,
                     beta=0.1, loss_type=["sigmoid"], max_steps=10**6, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer())
    return _StepAtATime(trainer)


def _scorer(model_dir: Path, workdir: Path, head: str):
    """The policy's trunk with the benchmark's `head` vector as a sequence classifier."""
    heads = np.load(workdir / "heads.npz")
    model = transformers.GPT2ForSequenceClassification.from_pretrained(model_dir, num_labels=1, **NO_DROPOUT["gpt2"])
    model.config.pad_token_id = wl.EOS
    with torch.no_grad():
        model.score.weight.copy_(torch.tensor(heads[head])[None])
    return model


def _trl_group(w: wl.Workload, model_dir: Path, workdir: Path):
    """TRL's RLOOTrainer or GRPOTrainer, one optimizer step per generation (their defaults),
    on the benchmark's prompts, against the same reward model; min_new_tokens keeps every
    completion at the full length, as on our side (random weights almost never emit EOS)."""
    from datasets import Dataset
    import trl

    config_cls, trainer_cls = {"rloo": (trl.RLOOConfig, trl.RLOOTrainer),
                               "grpo": (trl.GRPOConfig, trl.GRPOTrainer)}[w.name]
    unique = wl.prompts(w)[:: wl.GROUP_SIZE]
    args = config_cls(**_trl_args(w, workdir), per_device_train_batch_size=w.batch, gradient_accumulation_steps=1,
                      num_generations=wl.GROUP_SIZE, max_completion_length=w.response, beta=wl.GROUP_BETA,
                      temperature=1.0, top_k=0, top_p=1.0, max_steps=10**6,
                      generation_kwargs={"min_new_tokens": w.response})
    policy = transformers.GPT2LMHeadModel.from_pretrained(model_dir, **NO_DROPOUT["gpt2"])
    prompts = Dataset.from_dict({"prompt": [_words(p) for p in unique]})
    trainer = trainer_cls(model=policy, reward_funcs=_scorer(model_dir, workdir, "reward"), args=args,
                          train_dataset=prompts, processing_class=word_tokenizer(),
                          reward_processing_classes=word_tokenizer())
    return _StepAtATime(trainer)


def _trl_ppo(w: wl.Workload, model_dir: Path, workdir: Path):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    def scorer(head):
        return _scorer(model_dir, workdir, head)

    policy = transformers.GPT2LMHeadModel.from_pretrained(model_dir, **NO_DROPOUT["gpt2"])
    ref = transformers.GPT2LMHeadModel.from_pretrained(model_dir, **NO_DROPOUT["gpt2"])
    prompts = Dataset.from_dict({"input_ids": wl.prompts(w).tolist()})
    args = PPOConfig(**_trl_args(w, workdir), per_device_train_batch_size=w.batch, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=wl.PPO_EPOCHS, response_length=w.response,
                     local_rollout_forward_batch_size=w.batch, total_episodes=w.batch * 10**6, kl_coef=0.05,
                     num_sample_generations=0, stop_token=None, missing_eos_penalty=None)
    trainer = PPOTrainer(args=args, processing_class=word_tokenizer(), model=policy, ref_model=ref,
                         reward_model=scorer("reward"), value_model=scorer("value"), train_dataset=prompts,
                         eval_dataset=prompts)
    return _StepAtATime(trainer)

