"""Frangi backend presets and how a prompt selects one.

How a prompt becomes a preset:

1. the prompt, lower-cased with runs of whitespace collapsed, is looked up in
   :data:`PROMPT_PRESETS` (one explicit entry per prompt of every set in :mod:`models.prompts`);
2. otherwise the first rule of :data:`KEYWORD_RULES` whose keyword is a word of the prompt
   names the preset (e.g. "find the tiny vessels" -> ``"thin"``, "outline vessels but not the
   wire" -> ``"catheter"``);
3. otherwise the ``"default"`` preset.

The presets and the synthetic generator (:mod:`envs.synthetic`) were tuned together so that on
the default data the prompt matters image by image; ``tests/test_frangi.py`` pins the figures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FrangiPreset:
    """How to segment for one kind of request.

    Attributes:
        sigmas: Hessian scales in px; small ones (1.2) catch 1-2 px vessels, large ones (4-5.5)
            the main arteries. Vesselness is the maximum over these scales.
        threshold: vesselness at which ``prob`` is 0.5 (and above which a pixel is vessel).
        min_component_px: connected mask components smaller than this are dropped (noise).
        clahe: enhance local contrast (CLAHE) before filtering: brings up faint vessels.
        suppress_catheter: remove long, wide, constant-width tubes that enter from the image
            border (a catheter), see :func:`models.vesselness.catheter_zone`.
    """

    sigmas: tuple[float, ...]
    threshold: float
    min_component_px: int
    clahe: bool = False
    suppress_catheter: bool = False


_ALL = (1.2, 1.6, 2.2, 3.0, 4.0)
_FINE = (1.2, 1.6, 2.2, 3.0)
_STANDARD = (1.6, 2.2, 3.0)
_LARGE = (2.2, 3.0, 4.0, 5.5)
_MID = (1.6, 2.2, 3.0, 4.0)

PRESETS: dict[str, FrangiPreset] = {
    "default": FrangiPreset(_STANDARD, 0.075, 60),
    "small_branches": FrangiPreset(_FINE, 0.05, 40),
    "thin_careful": FrangiPreset(_FINE, 0.06, 80),
    "low_contrast": FrangiPreset(_STANDARD, 0.30, 80, clahe=True),
    "main_arteries": FrangiPreset(_LARGE, 0.12, 300),
    "large": FrangiPreset(_LARGE[1:], 0.15, 300),
    "precision": FrangiPreset(_STANDARD, 0.12, 150),
    "recall": FrangiPreset(_ALL, 0.035, 30),
    "catheter": FrangiPreset(_STANDARD, 0.075, 60, suppress_catheter=True),
    "thin": FrangiPreset(_FINE[:3], 0.05, 40),
    "denoise": FrangiPreset(_STANDARD, 0.085, 250),
    # Presets of the seed prompts that none of the above fits.
    "complete": FrangiPreset(_ALL, 0.055, 40),
    "network": FrangiPreset(_MID, 0.035, 200),  # permissive, but only sizeable connected parts
    "bifurcations": FrangiPreset(_FINE[:3], 0.075, 40),  # fine scales resolve the forks
    "visible": FrangiPreset(_STANDARD, 0.045, 40, suppress_catheter=True),  # vessels, no tube
    "careful_precise": FrangiPreset(_STANDARD, 0.075, 100, suppress_catheter=True),
}
"""Named presets; what each does is in its parameters (see :class:`FrangiPreset`)."""

PROMPT_PRESETS: dict[str, str] = {
    # The "seeds" set (the original team's prompts).
    "please segment the blood vessel.": "default",
    "please segment all blood vessels including small branches.": "small_branches",
    "please segment the complete vascular structure.": "complete",
    "please segment the entire blood vessel network.": "network",
    "please carefully segment blood vessel with thin branches.": "thin_careful",
    "please segment blood vessel and all its bifurcations.": "bifurcations",
    "please precisely segment blood vessel boundaries.": "precision",
    "please segment blood vessel even in low contrast regions.": "low_contrast",
    "please detect and segment all visible blood vessels.": "visible",
    "please segment the complete blood vessel including thin branches and bifurcations.": "recall",
    "please carefully segment all blood vessels with precise boundaries.": "careful_precise",
    # The "clinical" set.
    "segment the blood vessel": "default",
    "segment all blood vessels including small branches": "small_branches",
    "carefully segment blood vessel with thin branches": "thin_careful",
    "segment blood vessel even in low contrast regions": "low_contrast",
    "segment the main coronary arteries": "main_arteries",
    "segment only the large vessels": "large",
    "segment the vessel tree with high precision": "precision",
    "segment every vessel, favour recall over precision": "recall",
    "segment the contrast-filled vessels and ignore the catheter": "catheter",
    "segment the thin distal vessels": "thin",
    "segment the blood vessels and remove noise": "denoise",
}
"""Every prompt of :data:`models.prompts.PROMPT_SETS` (normalised: lower case, single spaces)
and its preset."""

KEYWORD_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("catheter", "wire", "guidewire", "tube"), "catheter"),
    (("low contrast", "low-contrast", "faint", "dim", "washed out", "washed-out"), "low_contrast"),
    (("precision", "precise", "precisely", "accurate", "strict", "conservative"), "precision"),
    (("noise", "noisy", "clean", "speckle", "denoise"), "denoise"),
    (("recall", "sensitive", "sensitivity", "every", "miss nothing"), "recall"),
    (("main", "major", "trunk", "proximal"), "main_arteries"),
    (("large", "larger", "largest", "big", "wide", "thick"), "large"),
    (("distal", "thin", "thinner", "tiny", "fine", "capillary", "capillaries"), "thin"),
    (("small", "smaller", "smallest", "branch"), "thin"),
    (("bifurcation", "fork", "junction"), "bifurcations"),
    (("visible",), "visible"),
    (("network", "connected"), "network"),
    (("complete", "entire", "whole", "full"), "complete"),
)
"""Keyword -> preset for prompts not in :data:`PROMPT_PRESETS`; the first matching rule wins.

A keyword matches a whole word (or words) of the normalised prompt, optionally followed by a
plural "s"/"es": "branch" matches "branches", "main" matches neither "remain" nor "maintain".
"""

DEFAULT_PRESET = "default"


def normalise_prompt(prompt: str) -> str:
    """Lower case with runs of whitespace collapsed: the form looked up in PROMPT_PRESETS."""
    return " ".join(prompt.lower().split())


def preset_name_for(prompt: str) -> str:
    """The name of the preset that ``prompt`` selects (see the module docstring)."""
    text = normalise_prompt(prompt)
    if text in PROMPT_PRESETS:
        return PROMPT_PRESETS[text]
    for keywords, name in KEYWORD_RULES:
        if any(re.search(rf"\b{re.escape(word)}(?:e?s)?\b", text) for word in keywords):
            return name
    return DEFAULT_PRESET
