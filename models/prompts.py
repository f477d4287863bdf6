"""The candidate text prompts the prompt-choosing policies pick from.

The first four are the original team's (see SEEDS.md); the other seven cover what a clinician
would plausibly ask for (thin distal branches, main arteries only, precision, recall, the
catheter). Configs may replace the list; backends must handle any prompt text.
"""

from __future__ import annotations

DEFAULT_PROMPT = "segment the blood vessel"

CANDIDATE_PROMPTS: tuple[str, ...] = (
    DEFAULT_PROMPT,
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
)
