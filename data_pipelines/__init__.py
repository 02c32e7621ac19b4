"""Data pipelines that write shards in the public schema (shared/DESIGN.md §1).

- ``data_pipelines.synthetic_world``: procedural cartoon half-body talkers with exact ground truth
  (audio envelope -> mouth opening, hand keypoints -> gloves), used for CPU training runs and for the
  oracle metrics in ``halfbody.metrics.oracle``.
"""
