"""Evaluation entry point: ``python -m halfbody.evaluate generated=out/ ground_truth=gt/`` (or ``list=test_list.txt
generated=out/``).

It only composes and runs (the lightning-hydra-template ``eval.py`` pattern): the work is in :mod:`halfbody.metrics`
(:mod:`~halfbody.metrics.inputs`: the pairs to score and the protocol checks;
:func:`halfbody.metrics.evaluation.run_evaluation`: the metrics; :mod:`~halfbody.metrics.report`: the outputs).
Settings and the pinned protocol: ``conf/evaluate.yaml``; definitions: ``docs/EVALUATION.md``.

- **Inputs.** ``generated`` and ``ground_truth``: two folders of videos matched by file stem; or ``list``: a
  ``python -m halfbody.generate`` batch list (``image audio [pose|-] [ground-truth video|-]``) with
  ``generated=<that run's output_dir>``, whose outputs are named as generate names them; the list's reference image
  (CSIM), audio (Sync) and ground truth (FID, FVD, SSIM, PSNR, LPIPS) are used.
- **Output.** ``<output_dir>/metrics.json`` (metrics, per-video values, skipped metrics with their reasons, the
  protocol, the inputs), ``metrics.md`` (a markdown table), and a W&B table when a wandb logger is configured.

:func:`evaluate` is the Python API (``halfbody.ablate`` calls it): ``evaluate(cfg) -> {"metrics", "skipped",
"per_video", "protocol"}``. A bad input ends in one line, ``error: <key>=<value>: <problem>``, and exit code 2.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from halfbody.metrics.inputs import check_protocol, collect_pairs
from halfbody.utils.devices import device_from
from halfbody.utils.errors import exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR

__all__ = ["evaluate", "main"]

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Score the videos ``cfg`` names; writes ``metrics.json`` and ``metrics.md`` in ``cfg.output_dir``.

    Returns ``{"metrics": {name: float}, "skipped": {name: reason}, "per_video": {stem: {...}}, "protocol": {...}}``
    (the JSON holds these plus ``inputs``, ``problems`` and the time). Raises ``UserError`` for bad inputs.
    """
    from halfbody.metrics.evaluation import run_evaluation
    from halfbody.metrics.report import write_report

    check_protocol(cfg)
    pairs, problems, inputs = collect_pairs(cfg)
    device = device_from(cfg)
    for line in problems:
        log.warning(line)
    result = run_evaluation(pairs, cfg, device)
    write_report(cfg, result, inputs, problems, device)
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
