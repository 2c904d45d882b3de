"""Model configs (transformers config kwargs) of the embedded teachers."""
