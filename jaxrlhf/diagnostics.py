"""What an evaluation reports beside the scores, to show reward hacking: diversity over words
and over the model's own tokens, a collapse indicator (how many of a policy's replies carry
its most frequent n-gram, against the reference policy's share of the same n-gram), and
reward per token. Pure functions of the replies (word lists or token-id lists)."""

from collections import Counter
from typing import Hashable, Iterable, Sequence

import numpy as np


def reply_tokens(out, eos_ids: tuple[int, ...]) -> list[list[int]]:
    """Each row's response token ids of a `sampling.generate` output, its closing EOS (any of
    `eos_ids`, the sampler's `SamplingConfig.eos_ids`) dropped."""
    p = out.sequences.shape[1] - out.response_mask.shape[1]
    rows = [s[m == 1].tolist() for s, m in zip(np.asarray(out.sequences[:, p:]), np.asarray(out.response_mask))]
    return [r[:-1] if r and r[-1] in eos_ids else r for r in rows]


def distinct(sequences: Iterable[Sequence[Hashable]], n: int) -> float:
    """Distinct n-grams over all n-grams of the sequences (words or token ids), pooled."""
    grams = [tuple(s[i: i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def ngrams(sequence: Sequence[Hashable], n: int) -> set[tuple]:
    """The distinct n-grams of one sequence."""
    return {tuple(sequence[i: i + n]) for i in range(len(sequence) - n + 1)}


def most_shared_ngram(sequences: Sequence[Sequence[Hashable]], n: int) -> tuple[tuple | None, float]:
    """The n-gram the most sequences contain (counted once per sequence; a tie goes to the one
    seen first) and the share of sequences that contain it -> (n-gram, share), or (None, 0.0)
    when no sequence is n long."""
    counts: Counter = Counter()
    for s in sequences:
        counts.update(sorted(ngrams(s, n), key=lambda g: _first_at(s, g)))
    if not counts:
        return None, 0.0
    gram, count = counts.most_common(1)[0]  # most_common keeps insertion order among equals
    return gram, count / len(sequences)


def _first_at(sequence, gram) -> int:
    n = len(gram)
    return next(i for i in range(len(sequence) - n + 1) if tuple(sequence[i: i + n]) == gram)


def share_containing(sequences: Sequence[Sequence[Hashable]], gram: tuple | None) -> float:
    """The share of sequences that contain `gram` (0.0 for None)."""
    if gram is None or not sequences:
        return 0.0
    return sum(gram in ngrams(s, len(gram)) for s in sequences) / len(sequences)


def collapse(tokens: Sequence[Sequence[int]], reference_tokens: Sequence[Sequence[int]], n: int) -> dict:
    """A policy's collapse indicator over its replies' token ids: its most shared token n-gram,
    the share of its replies that carry it, and the share of the reference policy's replies
    that carry the same n-gram. A share far above the reference's is a phrase the policy
    learned to repeat (often one the reward model happens to like)."""
    gram, share = most_shared_ngram(tokens, n)
    return {"ngram": gram, "share": share, "reference_share": share_containing(reference_tokens, gram)}


def per_token(scores_B: np.ndarray, tokens_B: np.ndarray) -> float:
    """Mean over replies of score / reply length in tokens (a reply's tokens count its EOS, so
    never 0): reward per token, to see a score bought with shorter or longer replies."""
    return float(np.mean(np.asarray(scores_B, np.float64) / np.maximum(np.asarray(tokens_B, np.float64), 1)))


def mean_and_std(scores_B: np.ndarray) -> tuple[float, float, int]:
    """The mean of the scores that are known (NaN: a reward function's None, left out), their
    std with Bessel's correction (TRL's nanstd) and their count; the mean NaN where none, the
    std where fewer than two, are known."""
    known = np.asarray(scores_B, np.float64)
    known = known[~np.isnan(known)]
    mean = float(known.mean()) if known.size else float("nan")
    return mean, float(known.std(ddof=1)) if known.size > 1 else float("nan"), int(known.size)


def mean_and_se(scores_B: np.ndarray) -> tuple[float, float]:
    """`mean_and_std`'s mean and its standard error, std / sqrt(count): for a 0/1 score,
    accuracy +- its SE. NaN where none (the SE: fewer than two) are known."""
    mean, std, count = mean_and_std(scores_B)
    return mean, std / count ** 0.5 if count > 1 else float("nan")
