"""One module per command that works on adapter files or models: inspect, convert, merge and resize,
extract, bake, generate. A tool imports the library, never another tool."""
