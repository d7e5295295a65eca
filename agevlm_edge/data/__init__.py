"""DATA DIR: the synthetic grounded world, real-format importers, SAM masks, tokenizer."""
