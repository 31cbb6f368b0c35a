"""The request option `reasoning`: "auto" | "fast" | "slow" (absent: nothing changes, nothing is computed).

What the two modes are, decided once per runtime (`FastSlow.from_runtime`):
- "slow": the request as given: its max_new_tokens and the prompt as rendered (for Qwen3, the chat
  template's default, thinking on).
- "fast": both of, where they apply:
  - thinking off, for a model whose chat template has Qwen3's `enable_thinking` switch: the tokens
    `enable_thinking=False` appends to the prompt (Qwen3: the empty think block
    "<think>\n\n</think>\n\n") are teacher-forced as the first outputs (`Request.forced_ids`), so
    the prompt is prefilled once, as for "slow", and the probe reads it before anything differs.
    The forced tokens are outputs: they count toward max_new_tokens and appear in the text, as a
    thinking answer's own think block does.
  - the short budget: max_new_tokens becomes min(the request's, `fast_max_new_tokens` of the config).
  A model with neither (no switch, no fast budget) has no fast mode: asking for one is an error.
- "auto": after the prompt's prefill the engine reads the probe's KV embedding of the request's
  slot (one gather and one device read) and the difficulty probe (probe.py) picks fast or slow.

The paper (eval_kv_classifier_generative.py) prefills the prompt, classifies, then generates anew
from the prompt plus "<think>\n</think>\n\n" (fast, budget 2048) or "<think>\n" (slow, 8192); it can
also switch mode once mid-generation. Here nothing is prefilled twice, "slow" leaves the opening of
the think block to the model, and there is no mid-generation switch.

The choice is recorded on the request (`reasoning_choice`, and `reasoning_p_slow` for "auto").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvzap_trt.config import REASONING_MODES
from kvzap_trt.device_reads import to_host
from kvzap_trt.errors import KvzapError
from kvzap_trt.kvcoe.probe import Probe

if TYPE_CHECKING:
    from kvzap_trt.cache.paged_cache import PagedKVCache
    from kvzap_trt.runtime.scheduler import Request



def think_block(tokenizer: Any) -> tuple[int, ...]:
    """The ids a chat template's `enable_thinking=False` appends to the generation prompt
    (Qwen3: "<think>\\n\\n</think>\\n\\n"); () when the template has no such switch."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return ()
    msgs = [{"role": "user", "content": "Hello."}]

    def render(thinking: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                  enable_thinking=thinking))

    on, off = render(True), render(False)
    if on == off:
        return ()
    if off[:len(on)] != on:
        raise KvzapError("the chat template's enable_thinking=False prompt does not extend its thinking prompt: "
                         "thinking off cannot be teacher-forced after the same prefill")
    return tuple(off[len(on):])


@dataclass(frozen=True)
class FastSlow:
    """What "fast" does for one runtime, and the probe "auto" uses.

    think_block: ids teacher-forced first in fast mode (() without an enable_thinking switch).
    fast_max_new_tokens: the fast budget (None: the request's own).
    probe: the difficulty probe (None: "auto" is refused)."""

    think_block: tuple[int, ...] = ()
    fast_max_new_tokens: int | None = None
    probe: Probe | None = None

    @classmethod
    def from_runtime(cls, rt: Any) -> "FastSlow":
        probe = None
        if rt.cfg.probe is not None:
            probe = Probe.load(rt.cfg.probe, rt.loaded.config, f"model {rt.cfg.preset or rt.cfg.model}")
            probe = probe.to(rt.cfg.device)
        return cls(think_block(rt.tokenizer), rt.cfg.fast_max_new_tokens, probe)

    def plan(self, mode: str | None) -> "Reasoning | None":
        """The per-request option -> what the engine applies after prefill (None: off)."""
        if mode is None:
            return None
        if mode not in REASONING_MODES:
            raise KvzapError(f"reasoning must be one of {', '.join(REASONING_MODES)}, got {mode!r}")
        if mode == "auto" and self.probe is None:
            raise KvzapError("reasoning auto needs a difficulty probe: give one with --probe "
                             "(from `kvzap-trt probe train`)")
        if mode != "slow" and not self.think_block and self.fast_max_new_tokens is None:
            raise KvzapError(f"reasoning {mode}: this model has no fast mode (its chat template has no "
                             "enable_thinking switch and no fast_max_new_tokens is configured)")
        return Reasoning(mode, self)


@dataclass(frozen=True)
class Reasoning:
    """One request's option, applied by the engine right after the request's prefill forward."""

    mode: str
    switch: FastSlow

    def decide(self, r: "Request", cache: "PagedKVCache") -> None:
        """Choose for `r` (its prompt in `cache`, nothing sampled yet) and apply the choice. A
        preempted request prefills again: it keeps its first choice and nothing is read again."""
        if r.reasoning_choice is not None:
            return
        choice = self.mode
        if choice == "auto":
            probe = self.switch.probe
            choice, r.reasoning_p_slow = probe.choose(to_host(probe.cfg.embedding(cache, r.slot)))
        r.reasoning_choice = choice
        if choice == "fast":
            r.forced_ids = list(self.switch.think_block) + list(r.forced_ids)
            budget = self.switch.fast_max_new_tokens
            if budget is not None and budget < r.sampling.max_new_tokens:
                r.sampling = dataclasses.replace(r.sampling, max_new_tokens=budget)  # requests may share one
