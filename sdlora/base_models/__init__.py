"""Base models: the families and how they differ, where a model comes from (folders, hub caches,
single files), module keys, the original checkpoint layouts and the shipped configs."""
