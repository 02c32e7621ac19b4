"""Generation (``python -m halfbody.generate``, the thin Hydra entry): a checkpoint (or a model config's own weights)
+ a reference image + audio (+ pose) -> an mp4 with sound, or one per row of a list file.

- :mod:`~halfbody.generation.inputs`: image / audio / pose loading and checks (keypoint ``.npy`` or driving video);
- :mod:`~halfbody.generation.model`: model config, checkpoint, settings, building the model, device and precision;
- :mod:`~halfbody.generation.family`: what generation asks of a family, through its pipeline class;
- :mod:`~halfbody.generation.conditions`: a job's inputs in the model's frame and the condition tensors;
- :mod:`~halfbody.generation.sampling`: one job through the family's ``generate_video``, with a progress bar;
- :mod:`~halfbody.generation.jobs`: single and batch jobs, :func:`generate`;
- :mod:`~halfbody.generation.writer`: mp4s encoded in a background thread.
"""
