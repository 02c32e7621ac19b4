"""Model parts both families share: autoencoders, audio encoders, schedulers and pretrained loading."""
