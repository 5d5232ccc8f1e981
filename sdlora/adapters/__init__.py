"""An adapter in memory: the contract every kind meets, LoRA, the LyCORIS kinds, the adapted layer,
targets and strength."""
