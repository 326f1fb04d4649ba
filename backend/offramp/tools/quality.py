"""Quality of an early-exit configuration against the full model's greedy output, in measures that
degenerate text cannot pass.

- ``reference_agreement``: the configuration's choices teacher-forced along the FULL model's greedy
  output, through the serving code path (scheduler, runner, exit policy, KV fill): at each position
  the engine picks a token as it would when serving, with the reference prefix in its KV cache, and
  the reference token replaces it before the next step. A looping output cannot score high: its
  choices are judged on the reference's prefix, not on its own.
- ``lcs_frac``: the longest common subsequence of token ids with the full-depth output (the
  candidate cut to the reference's length), over the reference's length.
- ``distinct2``: distinct bigrams over bigrams per output, averaged (repetition lowers it); beside
  the full-depth outputs' own value.

Teacher-forcing along the candidate's own output (``tools.teacher_forcing.teacher_forced_agreement``) is kept
as ``self_teacher_agreement``: it asks whether the full model, fed the candidate's text, would have
picked each token, which text stuck in a loop passes.
"""

from __future__ import annotations

from offramp.engine.llm_engine import LLMEngine
from offramp.engine.sampling import SamplingParams
from offramp.tools.teacher_forcing import teacher_forced_agreement


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence of two id lists (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def lcs_frac(outputs: list[list[int]], references: list[list[int]]) -> float | None:
    """Summed LCS with each reference (the output cut to the reference's length) over the summed
    reference lengths: an output that stops early or wanders off scores low."""
    total = sum(len(r) for r in references)
    if not total:
        return None
    return sum(lcs_length(o[: len(r)], r) for o, r in zip(outputs, references)) / total


def distinct2(outputs: list[list[int]]) -> float | None:
    """Mean over outputs (of two tokens or more) of distinct bigrams / bigrams: 1.0 never repeats a
    pair, a loop of period k over n tokens scores about k / n."""
    ratios = []
    for ids in outputs:
        pairs = list(zip(ids, ids[1:]))
        if pairs:
            ratios.append(len(set(pairs)) / len(pairs))
    return sum(ratios) / len(ratios) if ratios else None


def reference_agreement(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    references: list[list[int]],
    concurrency: int,
    params: SamplingParams | None = None,
) -> list[list[bool]]:
    """For each reference token: does the engine's exit configuration (its defaults, or ``params``'
    policy and threshold) pick it when the prefix before it is the reference's? Runs like serving,
    ``concurrency`` requests at a time; after each step the picked token is compared and replaced by
    the reference token, which the next step then computes (and exits, and fills the K/V of)."""
    base = params or SamplingParams()
    hits: dict[str, list[bool]] = {}
    pending = [(f"reference-{i}", p, r) for i, (p, r) in enumerate(zip(prompt_ids, references)) if r]
    live: dict[str, list[int]] = {}
    while pending or live:
        while pending and len(live) < concurrency:
            request_id, prompt, ref = pending.pop(0)
            forced = SamplingParams(
                max_tokens=len(ref), ignore_eos=True, exit_policy=base.exit_policy, exit_threshold=base.exit_threshold
            )
            engine.add_request(request_id, prompt, forced)
            live[request_id], hits[request_id] = ref, []
        grown, finished = engine.step()
        for seq in grown:
            ref = live.get(seq.request_id)
            if ref is None:
                continue
            start = len(hits[seq.request_id])
            for n in range(start, len(seq.output_token_ids)):
                hits[seq.request_id].append(seq.output_token_ids[n] == ref[n])
                seq.output_token_ids[n] = ref[n]  # not computed yet: the next step runs the reference token
        for seq in finished:
            live.pop(seq.request_id, None)
    return [hits.get(f"reference-{i}", []) for i in range(len(references))]


def quality_metrics(
    engine: LLMEngine,
    prompt_ids: list[list[int]],
    outputs: list[list[int]],
    full_outputs: list[list[int]],
    concurrency: int,
    params: SamplingParams | None = None,
) -> dict:
    """The bench's quality block, the reference-based measures first."""
    forced = [ok for row in reference_agreement(engine, prompt_ids, full_outputs, concurrency, params) for ok in row]
    own = [ok for p, o in zip(prompt_ids, outputs) for ok in teacher_forced_agreement(engine, p, o)]
    same = sum(a == b for a, b in zip(outputs, full_outputs))
    return {
        "reference_agreement": _share(forced),
        "lcs_frac": _round(lcs_frac(outputs, full_outputs)),
        "distinct2": _round(distinct2(outputs)),
        "full_depth_distinct2": _round(distinct2(full_outputs)),
        "sequence_match": round(same / len(outputs), 4) if outputs else None,
        "self_teacher_agreement": _share(own),
    }


def _share(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
