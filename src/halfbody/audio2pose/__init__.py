"""The audio-to-hand-pose family (issue 14, docs/AUDIO2POSE.md): audio + the reference pose -> arm and hand keypoint
sequences that drive EchoMimicV2's P_hands condition or MirrorMe's hand guider (``generate pose=auto``)."""
