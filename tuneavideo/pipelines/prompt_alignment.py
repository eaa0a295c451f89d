"""Which text tokens of a target prompt take which tokens' attention from the source prompt (Prompt-to-Prompt).

Token positions index the text encoder's sequence: 0 is the start token, the prompt's tokens follow, then the end
token and its padding up to `tokenizer.model_max_length` (77). A *word* is a space-separated piece of the prompt,
as Video-P2P splits it (`"Spider-Man"` is one word of several tokens); CLIP's tokenizer never lets a token span a
space, so a prompt's tokens are its words' tokens one after the other.

A `PromptEdit` says how the target's cross-attention maps are made from the source's while attention is replaced:
`target = (source @ mapping) * alphas + target * (1 - alphas)`, then multiplied by `reweight`; `blend` says which
tokens' maps make the local-blend mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import UserError

CONTROLS = ("replace", "refine")


class PromptControlError(UserError):
    """Attention-control settings that do not fit the prompts (one line, naming the setting and what to do)."""


@dataclass(frozen=True)
class PromptEdit:
    """Per text token (length `tokenizer.model_max_length`): what the target takes from the source.

    `mapping` `(tokens, tokens)`: target token j's map is `sum_i source_i * mapping[i, j]`; `alphas`: 1 where the
    target token takes that mapped map, 0 where it keeps its own (words only the target has, in refinement);
    `reweight`: factors on the target's maps (1 for words not reweighted); `blend`: `(2, tokens)`, 1 at the blend
    words' tokens of the source (row 0) and the target (row 1), or None for no local blend.
    """

    mapping: torch.Tensor
    alphas: torch.Tensor
    reweight: torch.Tensor
    blend: torch.Tensor | None = None


def word_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[list[int]]:
    """The token ids of each space-separated word of `prompt`, without start and end tokens."""
    return [tokenizer(word, add_special_tokens=False).input_ids for word in prompt.split(" ")]


def _checked_words(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[list[int]]:
    words = word_tokens(tokenizer, prompt)
    used = 2 + sum(map(len, words))
    if used > tokenizer.model_max_length:
        raise PromptControlError(f"the prompt {prompt!r} has {used - 2} tokens; attention control needs at most "
                                 f"{tokenizer.model_max_length - 2}: shorten it")
    return words


def word_positions(tokenizer: PreTrainedTokenizerBase, prompt: str, word: str, name: str = "word") -> list[int]:
    """The token positions of every occurrence of `word` (a whole space-separated word, case-insensitive as CLIP
    reads it) in `prompt`.

    Raises:
        PromptControlError: `word` is not a word of `prompt` (`name` says which setting it came from).
    """
    positions, start = [], 1
    for text, tokens in zip(prompt.split(" "), _checked_words(tokenizer, prompt)):
        if text.lower() == word.lower():
            positions += range(start, start + len(tokens))
        start += len(tokens)
    if not positions:
        raise PromptControlError(f"{name} {word!r} is not a word of the prompt {prompt!r} (words are split on "
                                 "spaces; use one of them)")
    return positions


def replace_mapping(tokenizer: PreTrainedTokenizerBase, source: str, target: str) -> torch.Tensor:
    """Word swap: prompts with the same word count, word k of the target takes word k's maps of the source.

    A word of the same token count maps token to token; otherwise every target token of it takes the sum of the
    source word's maps over its token count (as Prompt-to-Prompt). The end token and padding follow in order,
    the last target positions taking the source's last one when the target is shorter.

    Prompt-to-Prompt's mapper maps the tokens after the last swapped word position to position (j -> j), which
    misaligns them when the swapped words differ in token count; here they follow their own words.
    """
    source_words, target_words = _checked_words(tokenizer, source), _checked_words(tokenizer, target)
    if len(source_words) != len(target_words):
        raise PromptControlError(f"control 'replace' swaps words one for one, but the source prompt has "
                                 f"{len(source_words)} words and the target {len(target_words)}: use control "
                                 "'refine'")
    length = tokenizer.model_max_length
    mapping = torch.zeros(length, length)
    mapping[0, 0] = 1  # start token
    i = j = 1
    for source_tokens, target_tokens in zip(source_words, target_words):
        if len(source_tokens) == len(target_tokens):
            for k in range(len(source_tokens)):
                mapping[i + k, j + k] = 1
        else:
            mapping[i : i + len(source_tokens), j : j + len(target_tokens)] = 1 / len(target_tokens)
        i, j = i + len(source_tokens), j + len(target_tokens)
    for k in range(length - j):  # end token and padding
        mapping[min(i + k, length - 1), j + k] = 1
    return mapping


def _global_alignment(x: list[int], y: list[int]) -> list[int]:
    """For each position of `y`, the position of `x` aligned to it, or -1 where `y` has an insertion.

    Needleman-Wunsch with gap 0, match 1, mismatch -1; ties prefer an insertion in `y`, then a deletion from `x`,
    then a (mis)match, as Prompt-to-Prompt's `seq_aligner` does, so the same tokens align.
    """
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [["left"] * (len(y) + 1)] + [["up"] + [None] * len(y) for _ in x]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diagonal = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(left, up, diagonal)
            move[i][j] = "left" if score[i][j] == left else "up" if score[i][j] == up else "diagonal"
    aligned = [-1] * len(y)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        step = move[i][j]
        if step == "diagonal":
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == "left":
            j -= 1
        else:
            i -= 1
    return aligned


def refine_mapping(tokenizer: PreTrainedTokenizerBase, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Refinement (any word counts): the two token sequences aligned; aligned target tokens take their source
    token's map (`alphas` 1), inserted ones keep their own (`alphas` 0); padding maps position to position.

    Returns `(mapping, alphas)`.
    """
    source_ids = [tokenizer.bos_token_id, *sum(_checked_words(tokenizer, source), []), tokenizer.eos_token_id]
    target_ids = [tokenizer.bos_token_id, *sum(_checked_words(tokenizer, target), []), tokenizer.eos_token_id]
    length = tokenizer.model_max_length
    aligned = _global_alignment(source_ids, target_ids) + list(range(len(target_ids), length))
    mapping, alphas = torch.zeros(length, length), torch.zeros(length)
    for j, i in enumerate(aligned):
        if i >= 0:
            mapping[i, j], alphas[j] = 1, 1
    return mapping, alphas


def prompt_edit(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    target: str,
    control: str,
    reweight: dict[str, float] | None = None,
    blend: tuple[str, str] | None = None,
) -> PromptEdit:
    """The `PromptEdit` of `control` ("replace" or "refine") from `source` to `target`, with `reweight` factors
    on words of the target and local blend on `blend` = (a word of the source, a word of the target).

    Raises:
        PromptControlError: replace with different word counts, a blend or reweight word not in its prompt, a
            prompt too long.
    """
    if control == "replace":
        mapping = replace_mapping(tokenizer, source, target)
        alphas = torch.ones(tokenizer.model_max_length)
    elif control == "refine":
        mapping, alphas = refine_mapping(tokenizer, source, target)
    else:
        raise PromptControlError(f"control must be one of {', '.join(CONTROLS)}, got {control!r}")
    factors = torch.ones(tokenizer.model_max_length)
    for word, factor in (reweight or {}).items():
        factors[word_positions(tokenizer, target, word, "reweight word")] = factor
    words = None
    if blend is not None:
        words = torch.zeros(2, tokenizer.model_max_length)
        for row, (prompt, word, which) in enumerate(zip((source, target), blend, ("source", "target"))):
            words[row, word_positions(tokenizer, prompt, word, f"blend {which} word")] = 1
    return PromptEdit(mapping, alphas, factors, words)
