"""The candidate text prompts the prompt-choosing policies pick from, as named sets.

- ``"seeds"`` (the default): the original team's 11 prompts, verbatim (SEEDS.md). They are
  full sentences; the Sa2VA backend only adds the ``<image>`` prefix.
- ``"clinical"``: the project's earlier list: the gist of four of the seeds in instruction form
  plus seven requests a clinician would plausibly make (thin distal branches, main arteries
  only, precision, recall, the catheter).

Configs may pass any list; backends must handle any prompt text (the Frangi backend maps
unknown prompts by keyword, see :mod:`models.frangi_presets`).
"""

from __future__ import annotations

from models.errors import UserError

DEFAULT_PROMPT_SET = "seeds"

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "seeds": (
        "Please segment the blood vessel.",
        "Please segment all blood vessels including small branches.",
        "Please segment the complete vascular structure.",
        "Please segment the entire blood vessel network.",
        "Please carefully segment blood vessel with thin branches.",
        "Please segment blood vessel and all its bifurcations.",
        "Please precisely segment blood vessel boundaries.",
        "Please segment blood vessel even in low contrast regions.",
        "Please detect and segment all visible blood vessels.",
        "Please segment the complete blood vessel including thin branches and bifurcations.",
        "Please carefully segment all blood vessels with precise boundaries.",
    ),
    "clinical": (
        "segment the blood vessel",
        "segment all blood vessels including small branches",
        "carefully segment blood vessel with thin branches",
        "segment blood vessel even in low contrast regions",
        "segment the main coronary arteries",
        "segment only the large vessels",
        "segment the vessel tree with high precision",
        "segment every vessel, favour recall over precision",
        "segment the contrast-filled vessels and ignore the catheter",
        "segment the thin distal vessels",
        "segment the blood vessels and remove noise",
    ),
}
"""Named prompt lists; the first prompt of each is that set's default (baseline) prompt."""

CANDIDATE_PROMPTS: tuple[str, ...] = PROMPT_SETS[DEFAULT_PROMPT_SET]
"""The default candidate list (the seeds)."""

DEFAULT_PROMPT: str = CANDIDATE_PROMPTS[0]
"""The default (baseline) prompt: "Please segment the blood vessel."."""


def prompt_set(name: str) -> tuple[str, ...]:
    """The prompts of set ``name``; raises ``UserError`` naming the known sets otherwise."""
    if name not in PROMPT_SETS:
        raise UserError(f"unknown prompt set {name!r}; choose one of: {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]
