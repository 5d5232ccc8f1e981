"""An adapter on disk: the safetensors container and its header, tensor names, layouts, readers and writers."""
