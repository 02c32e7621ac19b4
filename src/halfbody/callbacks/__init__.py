"""Lightning callbacks shared by both families: sample videos, bad-sample accounting."""
