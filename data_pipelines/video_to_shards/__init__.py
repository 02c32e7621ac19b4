"""Raw talking-person videos -> webdataset shards in the public schema (shared/DESIGN.md §1).

    python -m data_pipelines.video_to_shards INPUT --out DIR [--config my.yaml] [--set crop.size=512 ...] [--workers N]
    python -m data_pipelines.video_to_shards.inspect DIR [--preview KEY --out preview.mp4]

INPUT is a folder of videos or an EMTD-style list file (``path start end [identity]`` per line). Per source:
decode at ``video.fps`` with 16 kHz mono audio (``decode``), split scenes and cut clips (``scenes``), filter
(``filters``), extract or read whole-body keypoints (``keypoints``), crop half-body (and optionally headshot)
squares (``crops``), encode, and write (``writer``). ``pipeline.run`` drives it over processes; re-runs skip
finished sources. The configuration (``config``, example in ``example.yaml``) names every threshold.

Public API::

    cfg = load_config("my.yaml", ["crop.size=256"])      # or PipelineConfig()
    report = run("videos/", "shards/", cfg, workers=4)   # -> Report (report.manifest = manifest.json)
"""

from __future__ import annotations

import importlib

__all__ = ["ConfigError", "PipelineConfig", "Report", "load_config", "run"]
_WHERE = {"ConfigError": "config", "PipelineConfig": "config", "load_config": "config", "Report": "pipeline",
          "run": "pipeline"}


def __getattr__(name: str):
    # Imported on first use, so that ``python -m data_pipelines.video_to_shards`` can answer Ctrl-C during its
    # (seconds-long) start-up with its one line instead of an import traceback.
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
