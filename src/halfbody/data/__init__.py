"""The shared data spine: shard schema, media I/O, condition rendering and the webdataset datamodule."""
