"""How the commands that read a run config name the settings an error asks to change.

A :class:`models.errors.UserError` names settings with :func:`models.errors.option`; the CLI
renders them with the ``OPTION_WORDS`` of the command the user ran, so ``sa2va-rl run`` says
``data.skip_bad: true`` where ``sa2va-rl check-data`` says ``--skip-bad``.
"""

from __future__ import annotations

CONFIG_WORDS = {
    "skip_bad": "data.skip_bad: true in the --config file",
    "format": "data.format in the --config file",
    "group_pattern": "data.group_pattern in the --config file",
    "model": "backend.model_size in the --config file",
    "cpu_backend": "--backend frangi",
    "margin_gb": "gpu.margin_gb in the --config file",
    "model_gb": "gpu.model_gb in the --config file",
    "inventory": "--inventory (gpu.inventory)",
}
"""The words of ``run``, ``train`` and ``train-reward-net``: their config keys and flags."""
