"""Base models: the families and how they differ, where a model comes from (folders, hub caches, single files), the original checkpoint layouts and the shipped configs."""
