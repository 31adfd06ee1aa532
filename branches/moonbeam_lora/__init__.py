"""Branch moonbeam_lora."""
