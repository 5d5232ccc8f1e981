"""What docs/reliability.md describes: files written whole, one run per output folder, and kill points for the tests."""
