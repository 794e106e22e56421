"""VL-MoE pretraining objectives: masked language modeling and BEiT-style masked image modeling masks."""
