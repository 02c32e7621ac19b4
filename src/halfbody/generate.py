"""Generation entry point: ``python -m halfbody.generate ckpt_path=<run>/checkpoints/last.ckpt ref=me.png audio=talk.mp3``.

It only composes and runs (the lightning-hydra-template ``eval.py`` pattern). The work is in
:mod:`halfbody.generation` (inputs, conditions, model and settings, jobs, the mp4 writer), which knows no family by
name; sampling lives in each family's pipeline (:class:`~halfbody.echomimic_v2.pipeline.EchoMimicV2Pipeline`,
:class:`~halfbody.mirrorme.pipeline.MirrorMePipeline`), the same code validation runs. Settings:
``conf/generate.yaml``.

- **Weights.** ``ckpt_path`` (a Lightning checkpoint from ``train``). Its model config is the run's own
  ``<run>/.hydra/config.yaml`` when the checkpoint sits in ``<run>/checkpoints/`` (``run_config=auto``), else the
  ``model`` group composed here (``family=...``, ``model=...``); a checkpoint of the other family is refused in one
  line. Without ``ckpt_path`` the model config's own weights are used (the pretrained / imported directories, e.g.
  ``model=echomimic_v2 model/network=echomimic_v2_official``).
- **Inputs.** ``ref``: an image (png / jpg / webp, any size), resized and centre-cropped to the model's resolution
  like validation crops a training clip, or cropped to its half-body box from its keypoints
  (``ref_keypoints=<(133, 3) or (1, 133, 3) .npy>``, ``crop=keypoints``, the ``video_to_shards`` crop). ``audio``: any
  file PyAV decodes, any rate and channel count. ``pose``: optional COCO-WholeBody keypoints ``(T, 133, 3)`` in
  ``[0, 1]`` of the reference image's frame, at ``pose_fps`` (default ``fps``), or a driving video whose keypoints
  the pipeline's extractor reads (``pose_extractor.*``) at ``fps``; a family whose pipeline requires a pose
  (EchoMimicV2) says so in one line without one.
- **Output.** An H.264 + AAC mp4 exactly as long as the audio (``round(seconds * fps)`` frames), at ``fps``, written
  to a temporary name and renamed when complete.
- **Batch mode.** ``list=<file>``: one row per video (``image audio [pose|-] [ground-truth video|-]``), one mp4 per
  row in ``output_dir``; finished outputs are skipped on a re-run, a bad row is reported in one line and skipped,
  a summary ends the run (``summary.json`` in ``output_dir``); the exit code is 2 when a row failed.

A bad input ends in one line, ``error: <key>=<value>: <problem>``, and exit code 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from halfbody.generation.jobs import generate
from halfbody.utils.errors import exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR

__all__ = ["generate", "main"]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        summary = generate(cfg)
    if summary["failed"]:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
