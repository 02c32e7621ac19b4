"""Data pipelines that write shards in the public schema (shared/DESIGN.md §1).

- ``data_pipelines.synthetic_world``: procedural cartoon half-body talkers with exact ground truth
  (audio envelope -> mouth opening, hand keypoints -> gloves), used for CPU training runs and for the
  oracle metrics in ``halfbody.metrics.oracle``.
- ``data_pipelines.video_to_shards``: real talking-person videos (a folder or an EMTD-style segment list) ->
  scene-split, filtered, half-body (and headshot) cropped clips with whole-body keypoints; plus a shard inspector.
"""
